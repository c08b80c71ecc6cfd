import sys
from pathlib import Path

# Tests import helpers (tests/launch.py) and the package from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# The longest file (the quickstart, ~3 minutes) first: with `-n 2 --dist loadfile` one worker
# takes it while the other runs the rest, instead of it starting last on an idle suite.
FIRST = ("tests/test_quickstart.py",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(FIRST))
