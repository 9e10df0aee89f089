"""FlowOps: a Ray-native MLOps platform for vision models.

Nothing happens at import time: settings are read when asked for (`flowops.settings.get_settings`).
"""

__version__ = "0.1.0"
