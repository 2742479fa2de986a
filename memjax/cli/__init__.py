"""The command-line layer: flags made from the stages' configs, and start-up."""
