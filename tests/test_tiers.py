"""The fast tier (`make test-fast`): tests/conftest.py marks every test that starts a process (itself,
through a helper of tests/, or through a fixture) as e2e, read from the tests' source; `make test` runs all,
in two pytest-xdist workers that tests/conftest.py's scheduler hands units of tests to."""

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
    # the dense == chunked contracts and the pieces' fixtures, reached by name: a helper of tests/ with a common
    # name that starts a process (a `trainer`, a `run`) once moved ~300 of them out of the fast tier
    assert not _spawns("test_protocols", "test_chunked_equals_dense_for_every_combination")
    assert not _spawns("conftest", "tiny_tokenizer") and not _spawns("conftest", "data")


def test_a_test_is_e2e_through_its_fixtures(request):
    """A test whose fixture builds its artifact with the CLI (tests/stores/teacher_cache/test_cli.py's cli_cache) is e2e too:
    the marks are on the collected items."""
    assert _spawns("test_cli", "cli_cache")
    items = request.session.items
    marked = {i.nodeid.split("::")[-1]: bool(i.get_closest_marker("e2e")) for i in items}
    assert marked.get("test_a_test_is_e2e_through_its_fixtures") is False


def test_make_tests_workers_keep_together_what_must_not_be_split():
    """`make test` runs two pytest-xdist workers; tests/conftest.py's scheduler gives each work unit, whole, to
    one of them: the Slurm cluster's tests, a module's tests sharing a module-scoped fixture, the tests an
    xdist_group mark names; every other test is a unit of its own."""
    from tests.conftest import _heavy, xdist_group

    assert xdist_group("tests/test_slurm.py::test_launcher_configs_give_each_job_one_thread_per_cpu[x-y]") == "slurm"
    assert xdist_group("tests/test_slurm.py::test_a_preempted_job_is_requeued_and_resumes_from_its_checkpoint") == (
        "slurm"
    )
    shared = "tests/test_end_to_end.py::test_record_holds_what_the_issue_lists"  # its module-scoped fixture
    assert xdist_group(shared) == "tests/test_end_to_end.py"
    alone = "tests/test_end_to_end.py::test_report_on_an_empty_folder_fails_clearly"
    assert xdist_group(alone) == alone
    # the 2-rank full_kd run three modules read: built once (tests/helpers.built_once), by one worker
    assert {
        xdist_group("tests/test_distributed.py::test_two_ranks_train_the_one_process_weights[se_kd]"),
        xdist_group(
            "tests/test_placement.py::test_a_two_rank_run_records_its_world_size_and_tokens_per_second_per_device"
        ),
        xdist_group(
            "tests/test_distributed_scoring.py::test_scoring_after_two_ranks_sees_one_process_and_scores_the_weights_as_one_process@ddp"
        ),
    } == {"ddp"}
    # the units that start processes or are slow are handed out first (the marks above, read from the sources)
    assert _heavy(shared) and _heavy("tests/test_config_hashes.py::test_every_hash_is_what_it_was")
    assert not _heavy(alone) and not _heavy("tests/test_tiers.py::test_a_test_that_starts_none_is_not")
