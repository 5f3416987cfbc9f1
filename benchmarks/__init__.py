"""Side-by-side benchmarks of jaxckpt against the baselines users would otherwise use.

Run them all with `python -m benchmarks.run [--smoke | --quick] [--json PATH]`; see README.md.
"""
