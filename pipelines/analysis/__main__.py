"""`python -m pipelines.analysis [TARGET]`: execute every notebook and render the README's charts."""

from pipelines.analysis.notebooks import main

main()
