"""Applications of jaxckpt: configs, tasks (data, model, loss) and the `run.py` entry point."""
