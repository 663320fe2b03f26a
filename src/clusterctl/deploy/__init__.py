"""Deploy: facts -> changes (typed steps with their commands) -> one executor.

    model.py     the data: Desired, NodeFacts, Step
    desired.py   what each node should hold (controller side)
    facts.py     what a node holds (one read-only probe, pure parsers)
    changes.py   (desired, facts) -> steps; pure
    ops.py       the exact commands of each step; pure
    checks.py    preflight (pure) and read-only service probes
    executor.py  the one writer: runs operations, verifies, rolls back
    gate.py      the read-only transport a dry run gets
    managers/    systemd, launchd, direct: how a service is controlled
    scripts/     the shell programs run on nodes (package data)
    rollout.py   orchestration: nodes in parallel, phases as barriers
"""
