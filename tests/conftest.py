"""How the suite splits over the two processes of pytest-xdist (``--dist loadgroup``, see pyproject.toml).

Every test file is one group, so its module fixtures (a tuned model, a study, built plans) are made once, in one
process; the zoo's models are one group each, because one file of four real models would keep a process busy
for most of the suite. The longest groups start first, so the run does not end waiting on one of them.
"""

import pytest

# Minutes each, roughly in this order on 2 cores (the zoo's detector alone is about ten).
_LONG_FIRST = ("test_zoo.py", "test_real_model.py", "test_search_cli.py", "test_tune.py", "test_operators.py",
               "test_cli.py", "test_search.py", "test_report.py")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.name))
    rank = {name: index for index, name in enumerate(_LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its own order
