"""python -m memjax.index (temporary shim during the restructure)."""
from memjax import cli
from memjax.stages.index import main

if __name__ == "__main__":
  cli.run_main(main)
