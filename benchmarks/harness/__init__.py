"""The peer benchmark behind benchmarks/run_benchmarks.py, in parts:

    systems.py   what is measured: each system, its venv, the pinned peer environments
    runner.py    orchestration: venvs, artifacts, one worker process per measurement
    report.py    RESULTS.md from the run's results
    workers/     what runs inside each system's venv, one module per peer

Only the standard library is imported at module level anywhere here: the workers run in
the peers' venvs, which hold the peer and nothing of ours.
"""
