"""The fast tier (`make test-fast`): tests/conftest.py marks every test that starts a process (itself,
through a helper of tests/, or through a fixture) as e2e, read from the tests' source; `make test` runs all."""

from __future__ import annotations

from tests.conftest import _spawns


def test_a_test_that_starts_processes_is_e2e_directly_or_through_a_helper():
    assert _spawns("test_launch", "test_from_env_reads_the_process_environment_by_default")  # subprocess.run
    assert _spawns("test_distributed", "test_two_ranks_train_the_one_process_weights")  # two_ranks_and_one -> torchrun
    assert _spawns("helpers", "sekd_train")


def test_a_test_that_starts_none_is_not():
    assert not _spawns("test_launch", "test_each_rank_takes_a_card_it_can_see")
    assert not _spawns("test_config_hashes", "test_every_hash_is_what_it_was")  # slow, in-process: marked slow
    assert not _spawns("test_tiers", "test_a_test_that_starts_none_is_not")


def test_a_test_is_e2e_through_its_fixtures(request):
    """A test whose fixture builds its artifact with the CLI (tests/stores/teacher_cache/test_cli.py's cli_cache) is e2e too:
    the marks are on the collected items."""
    assert _spawns("test_cli", "cli_cache")
    items = request.session.items
    marked = {i.nodeid.split("::")[-1]: bool(i.get_closest_marker("e2e")) for i in items}
    assert marked.get("test_a_test_is_e2e_through_its_fixtures") is False
