"""The multi-host fixtures (tests/multihost.py), registered here once so that every integration
module asking for them shares ONE two-host cluster per session (a fixture imported into two modules
would be built twice). Nothing starts unless a test asks for `two_hosts` or `head_postgres`."""

from tests.multihost import head_postgres, two_hosts  # noqa: F401


def pytest_collection_modifyitems(items):
    """Multi-host tests run last: the two hosts then live only while those tests run."""
    items.sort(key=lambda item: "two_hosts" in getattr(item, "fixturenames", ()))
