"""python -m pipeline.retrain (see pipeline.retrain.cli)."""
import sys

from pipeline.retrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
