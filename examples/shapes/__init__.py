"""An engineer's own image classifier (`train.py`) and the few lines that make it a FlowOps task
(`task.py`). Run from the folder above this one so that `shapes` imports as a package."""
