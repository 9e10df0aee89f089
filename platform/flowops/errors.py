"""One error tree. The CLI turns each into one clear line and a non-zero exit; HTTP routes into 4xx."""


class FlowOpsError(Exception):
    """Base of every error FlowOps raises on purpose. The message says what was asked and what exists."""

    exit_code = 1


class InvalidInput(FlowOpsError):
    """The caller asked for something malformed or out of range."""

    exit_code = 2


class NotFound(FlowOpsError):
    """A named thing (data version, model version, job, workload) does not exist."""

    exit_code = 3


class Conflict(FlowOpsError):
    """The request clashes with current state: a port in use, another `up` running, a duplicate."""

    exit_code = 4


class ClusterUnavailable(FlowOpsError):
    """The Ray cluster (or another platform service) cannot be reached."""

    exit_code = 5


class GateFailed(FlowOpsError):
    """A model did not pass a validation gate or a canary analysis."""

    exit_code = 6


class JobFailed(FlowOpsError):
    """A submitted Ray job (or a pipeline step) ended in failure."""

    exit_code = 7
