"""python -m pipeline: the same as the ielts-distill command."""
from pipeline.cli import main

main()
