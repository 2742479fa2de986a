"""python -m memjax.extract (temporary shim during the restructure)."""
from memjax import cli
from memjax.stages.extract import main

if __name__ == "__main__":
  cli.run_main(main)
