"""What the notebooks and `dodo-segment report` share: the read-only warehouse, the queries, the
charts, and running the notebooks (`from pipelines import analysis` in a notebook).

- `reader`: which warehouse (DODO_SEGMENT_DB, the default path, or demo data), read-only.
- `queries`, `dunning`: every query both show, once.
- `charts`: the style and the drawing of each chart both show.
- `notebooks`: execute a notebook, read its published figures, render the README's images.
"""

from pipelines.analysis import charts, dunning, queries
from pipelines.analysis.charts import SAVE_FIGURES_ENV, finish_figure, money, use_style
from pipelines.analysis.notebooks import (
    FIGURES_PREFIX,
    NOTEBOOKS,
    README_IMAGES,
    REPO,
    execute_notebook,
    publish,
    read_figures,
    render_images,
)
from pipelines.analysis.reader import (
    DEMO_WAREHOUSE,
    NoModelsYet,
    Warehouse,
    WarehouseChoice,
    build_demo_warehouse,
    choose_warehouse,
    demo_cache_path,
    open_warehouse,
    pending_identifies,
)

__all__ = [
    "DEMO_WAREHOUSE", "FIGURES_PREFIX", "NOTEBOOKS", "README_IMAGES", "REPO", "SAVE_FIGURES_ENV",
    "NoModelsYet", "Warehouse", "WarehouseChoice", "build_demo_warehouse", "charts",
    "choose_warehouse", "demo_cache_path", "dunning", "execute_notebook", "finish_figure",
    "money", "open_warehouse", "pending_identifies", "publish", "queries", "read_figures",
    "render_images", "use_style",
]  # fmt: skip
