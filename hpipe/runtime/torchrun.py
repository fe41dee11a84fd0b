"""Several hosts: the same run as ``hpipe execute``, with processes started by torchrun.

On each host of the plan, start as many processes as the plan has devices on
that host; every process names its scenario host with ``--host``, and the
processes of a host take that host's devices in plan order (local rank 0 the
first, ...), whatever node rank torchrun gave the host.  Global rank 0 gathers
the timelines and writes the measured Result.  ``--commands`` prints the
torchrun line for every host, with the master address taken from the
scenario's ``address`` of the first stage's host (or ``--master-addr``)::

    python -m hpipe.runtime.torchrun scenarios/two-hosts.yaml --planner hpipe --commands

``--set`` changes the scenario as it does for ``hpipe execute``; the printed commands carry it
to every host.  The processes compare the model, plan, inputs and seed when they meet (a
host whose differ refuses, naming what); a --set of other fields (a link's figures, the
cost model) changes only rank 0's prediction beside the measurement.

Before any process joins the process group, every process says on torchrun's store whether
it is ready (``_meet``): one that refuses its input (a ``--host`` not in the scenario, a plan
that does not fit after its ``--set``) is named to all within a second, where its peers had
waited out the 600 s startup timeout in ``init_process_group`` with an error naming no host.
Every receive is bounded by ``--timeout``; there is no launcher above the workers here, so a
host that dies is noticed by its peers' timeouts and by torchrun, which then stops the others.
A host that never starts is torchrun's to notice: the printed commands bound its rendezvous
(``--rdzv-conf=timeout=``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from collections import Counter

RENDEZVOUS_TIMEOUT_S = 900
"""How long the printed commands let torchrun wait for every host to start (its static
rendezvous waits without end otherwise: hosts started by hand, one after another, get 15 min)."""
MEET_PREFIX = "hpipe/meet/"
"""Keys of ``_meet`` on torchrun's store (the agent's, which every worker reaches)."""


class _Once(argparse.Action):
    """A one-value option given at most once: argparse keeps the last of ``--planner a
    --planner b`` without a word (``hpipe``'s own commands refuse it too, cli._OnceCommand)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen = False

    def __call__(self, parser, namespace, values, option_string=None):
        if self.seen:
            parser.error(f"{option_string}: given twice; it takes one value")
        self.seen = True
        setattr(namespace, self.dest, values)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m hpipe.runtime.torchrun", description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--plan", action=_Once, help="Plan JSON to run")
    g.add_argument("--planner", action=_Once, help="planner to make the plan with (default: the scenario's)")
    ap.add_argument("--host", action=_Once, help="the scenario host this process runs on")
    ap.add_argument("--inputs", action=_Once, help="JSON list of token-id lists, one per sequence")
    ap.add_argument("--json", action=_Once, dest="json_path", help="where global rank 0 writes the Result JSON ('-': stdout)")
    ap.add_argument("--check", action="store_true", help="rank 0 also runs the model in one process")
    ap.add_argument("--timeout", action=_Once, type=float, default=60.0, help="seconds a worker waits on a peer")
    ap.add_argument("--warmup", action=_Once, type=int, default=1, help="unmeasured runs before the measured one")
    ap.add_argument("--seed", action=_Once, type=int, default=0)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="change a scenario field before it is checked, as `hpipe execute --set` "
                         "(dotted path, e.g. workload.seq_len=4096); repeatable; every host needs the same")
    ap.add_argument("--commands", action="store_true", help="print the torchrun command of every host and exit")
    ap.add_argument("--master-addr", action=_Once, help="rendezvous address for --commands (default: from the scenario)")
    ap.add_argument("--master-port", action=_Once, type=int, default=29500)
    return ap


def _plan(setup, args):
    from hpipe.plan import load_plans

    if args.plan:
        plans = load_plans(args.plan)
        if len(plans) != 1:
            from hpipe.errors import InputError

            raise InputError(f"one plan expected, the file holds {len(plans)}", file=args.plan)
        return plans[0].check(setup, file=args.plan).check_codecs(setup, file=args.plan).as_read()
    from hpipe.planners import make_plan

    return make_plan(setup, args.planner or setup.scenario.planner.kind)


def _sets(args) -> str:
    """The --set options as the printed command lines carry them (every host reads the
    scenario alike)."""
    return "".join(f" --set {shlex.quote(a)}" for a in args.sets)


def commands(setup, plan, args) -> list[str]:
    """One torchrun command line per host that holds plan devices, each with the options given
    here: what every process must share (--plan or --planner, --set, --inputs, --seed, --warmup,
    --timeout) on all, what global rank 0 does (--json, default result.json; --check) on node 0's."""
    per_host = Counter(d.split("/", 1)[0] for d in plan.devices)
    first_host = plan.devices[0].split("/", 1)[0]
    addresses = {h.name: h.address for h in setup.scenario.cluster.hosts}
    master = args.master_addr or addresses.get(first_host) or "127.0.0.1"
    defaults = _parser().parse_args([args.scenario])
    shared = ((f"--plan {shlex.quote(args.plan)}" if args.plan else f"--planner {plan.planner}") + _sets(args)
              + (f" --inputs {shlex.quote(args.inputs)}" if args.inputs else "")
              + "".join(f" --{name} {getattr(args, name):g}" for name in ("seed", "warmup", "timeout")
                        if getattr(args, name) != getattr(defaults, name)))
    rank0 = f" --json {shlex.quote(args.json_path or 'result.json')}" + (" --check" if args.check else "")
    lines = []
    for node_rank, (host, n) in enumerate(sorted(per_host.items(), key=lambda kv: kv[0] != first_host)):
        lines.append(f"# on {host} ({addresses.get(host) or 'address not given'}):\n"
                     f"torchrun --nnodes={len(per_host)} --node-rank={node_rank} --nproc-per-node={n} "
                     f"--master-addr={master} --master-port={args.master_port} "
                     f"--rdzv-conf=timeout={RENDEZVOUS_TIMEOUT_S} "
                     f"-m hpipe.runtime.torchrun {shlex.quote(args.scenario)} {shared} --host {host}"
                     + (rank0 if node_rank == 0 else ""))
    return lines


def _store():
    """torchrun's store (the agent's, which every worker reaches), under ``MEET_PREFIX``."""
    from datetime import timedelta

    import torch.distributed as dist

    return dist.PrefixStore(MEET_PREFIX, dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
        timeout=timedelta(seconds=60)))


def _say_started() -> None:
    """Post that this process runs (before it plans): a peer that never says so within --timeout
    failed before it could say anything else (see ``_meet``)."""
    _store().set(f"started/{os.environ['RANK']}", "1")


def _refuse(host: str | None, refusal: BaseException) -> None:
    """Post this process's refusal, so that its peers stop at once naming it (``_meet``)."""
    from hpipe.errors import HpipeError

    code = refusal.code if isinstance(refusal, SystemExit) else getattr(refusal, "exit_code", 1)
    message = (str(refusal) if isinstance(refusal, HpipeError) else
               "its command line was refused (see that host's output)" if isinstance(refusal, SystemExit) else
               "interrupted" if isinstance(refusal, KeyboardInterrupt) else f"{type(refusal).__name__}: {refusal}")
    _store().set(f"ready/{os.environ['RANK']}", json.dumps(
        {"host": host or "(no --host)", "exit_code": code if isinstance(code, int) else 1, "message": message}))


def _meet(start_wait_s: float, ready_wait_s: float) -> None:
    """Post that this process is ready to join the process group, and wait until every process
    has said whether it is: a refusal is raised on every process, naming the host that refused,
    with its exit code.  (A process that refused before ``init_process_group`` had left its peers
    waiting there for the whole startup timeout, 600 s, to fail naming no host.)  A peer that
    has not even said it started within ``start_wait_s`` failed before it could say why; one
    that started is given ``ready_wait_s`` (its planning may take a while)."""
    from hpipe.errors import HpipeError, WorkerError

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = _store()
    store.set(f"ready/{rank}", json.dumps(None))
    start, posted = time.monotonic(), {}
    while True:
        for r in range(world):
            if r not in posted and store.check([f"ready/{r}"]):
                posted[r] = json.loads(store.get(f"ready/{r}"))
        refused = sorted((r, v) for r, v in posted.items() if v is not None)
        if refused:
            r, v = refused[0]
            err = HpipeError(f"host {v['host']} (rank {r}) refused, so this one stops too: {v['message']}")
            err.exit_code = v["exit_code"]
            raise err
        if len(posted) == world:
            return
        waited = time.monotonic() - start
        silent = [r for r in range(world) if r not in posted and not store.check([f"started/{r}"])]
        if silent and waited > start_wait_s:
            raise WorkerError(f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} did not start "
                              f"within {start_wait_s:g} s (--timeout): failed before it could say why; see that "
                              f"host's output")
        if waited > ready_wait_s:
            late = sorted(set(range(world)) - set(posted))
            raise WorkerError(f"rank{'s' if len(late) > 1 else ''} {', '.join(map(str, late))} not ready after "
                              f"{ready_wait_s:g} s")
        time.sleep(0.05)


def main(argv=None) -> int:
    from hpipe.errors import HpipeError

    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # a command line refused on one host under torchrun: its peers stop too
        if e.code and "LOCAL_RANK" in os.environ:
            argv = sys.argv[1:] if argv is None else argv
            host = next((b for a, b in zip(argv, argv[1:]) if a == "--host"), None)
            with contextlib.suppress(Exception):
                _refuse(host, e)
        raise
    try:
        return _main(args)
    except HpipeError as e:
        print(f"hpipe: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:  # Ctrl-C reaches every worker of the host: one line each, not a traceback
        print("hpipe: interrupted", file=sys.stderr)
        code = 130
    except Exception as e:
        from hpipe.runtime.worker import CommError

        if not isinstance(e, CommError):
            raise
        from hpipe.runtime.launcher import _without_advice

        # a peer failed or timed out: one line, not a traceback (each host sees its own side)
        print(f"hpipe: on host {args.host}: {_without_advice(str(e)).strip()}", file=sys.stderr)
        code = 1
    return _leave(code)


def _leave(code: int) -> int:
    """The exit code; where a process group is up, leave at once (as the launcher's workers do):
    tearing down a group whose peers failed or were interrupted can block, or abort the
    interpreter at exit ("terminate called without an active exception", SIGABRT)."""
    if "torch.distributed" not in sys.modules:  # never imported (--commands, a refusal before): nothing up
        return code
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(args) -> int:
    from hpipe.errors import InputError

    if args.commands:
        setup, plan, _ = _planned(args)
        print("\n".join(commands(setup, plan, args)))
        if not args.plan:  # each host would plan for itself: one plan file for all is safer
            sets = _sets(args)
            print(f"hpipe: every host plans for itself with --planner {plan.planner}; hosts whose hpipe "
                  f"differs may plan differently (and refuse). For one plan on all: hpipe plan "
                  f"{shlex.quote(args.scenario)} --planner {plan.planner}{sets} -o plan.json, copy it to "
                  f"every host, and print these with --plan plan.json{sets}", file=sys.stderr)
        if args.inputs:
            print(f"hpipe: every host reads --inputs {args.inputs}: copy it to each", file=sys.stderr)
        return 0
    if "LOCAL_RANK" not in os.environ:
        raise InputError("not started by torchrun (LOCAL_RANK is unset); see --commands", field="--host")
    _say_started()
    try:
        cfg, setup, plan, predicted = _prepare(args)
    except (Exception, KeyboardInterrupt) as e:  # said to the peers, which stop too (_meet)
        with contextlib.suppress(Exception):  # a store gone is not this process's error
            _refuse(args.host, e)
        raise
    _meet(start_wait_s=args.timeout, ready_wait_s=cfg.startup_timeout_s)
    return _run(args, cfg, setup, plan, predicted)


def _planned(args):
    """The scenario, the plan, and its prediction; InfeasibleError (exit 3) where it does not fit."""
    from hpipe.errors import InfeasibleError
    from hpipe.scenario import load_scenario
    from hpipe.sim import simulate

    setup = load_scenario(args.scenario, overrides=args.sets).resolve()
    if args.json_path and not args.commands:  # before any work (planning too), as `hpipe execute` checks it
        from pathlib import Path

        from hpipe.io import check_outputs

        check_outputs({"--json": args.json_path}, inputs={"the scenario file": Path(args.scenario),
                                                          "--plan": Path(args.plan) if args.plan else None,
                                                          **setup.scenario.files_read()})
    plan = _plan(setup, args)
    predicted = simulate(setup, plan)  # every process alike: all refuse a plan that does not fit, as execute does
    if not predicted.feasible:
        raise InfeasibleError(f"plan does not fit: {predicted.infeasible}")
    return setup, plan, predicted


def _prepare(args):
    """Everything this process checks and builds before it joins: its WorkerConfig."""
    from hpipe.errors import InputError

    setup, plan, predicted = _planned(args)
    if not args.host:
        raise InputError("--host is required: the scenario host this process runs on", field="--host")
    from hpipe.runtime.launcher import (backend_for, item_codecs, load_inputs, make_ids, placement_of,
                                        runtime_spec, stage_roles)
    from hpipe.runtime.worker import WorkerConfig

    hosts = {h.name for h in setup.scenario.cluster.hosts}
    if args.host not in hosts:
        raise InputError(f"no host {args.host!r} in the scenario", field="--host")
    local_rank = int(os.environ["LOCAL_RANK"])
    mine = [i for i, d in enumerate(plan.devices) if d.split("/", 1)[0] == args.host]
    if local_rank >= len(mine):
        raise InputError(f"the plan has {len(mine)} device(s) on host {args.host}, but this is local rank "
                         f"{local_rank}: start --nproc-per-node={len(mine)}", field="--host")
    role = mine[local_rank]
    spec = runtime_spec(setup)
    ids = make_ids(setup, load_inputs(args.inputs, setup) if args.inputs else None, args.seed)
    stages = stage_roles(spec, plan)
    place = placement_of(setup, plan.devices[role])
    backend = backend_for([setup.cluster.device(d).runtime_device for d in plan.devices])
    cfg = WorkerConfig(role=role, devices=plan.devices, stages=stages, spec=spec, dtype=setup.dtype,
                       weights=setup.weights, seed=args.seed, ids=ids, slices=list(plan.slices),
                       mb_sizes=plan.micro_batch_sizes(setup.batch_size), device=place.device,
                       threads=place.threads, cores=place.cores, backend=backend, init_method="env://",
                       world_size=int(os.environ["WORLD_SIZE"]), rank=None, host=args.host,
                       timeout_s=args.timeout, warmup=args.warmup,
                       codecs=item_codecs(setup, plan))  # the plan's codecs, as `hpipe execute` sends them
    if setup.output_tokens > 0:  # generation: decode steps follow the prefill
        from hpipe.runtime.generation import generation_config

        cfg.generation = generation_config(setup, plan, spec)
    if int(os.environ.get("RANK", "0")) != 0 and (args.json_path or args.check):
        print(f"hpipe: --json and --check are global rank 0's (node rank 0), not this process's "
              f"(rank {os.environ['RANK']}, host {args.host}): give them on node 0's command", file=sys.stderr)
    return cfg, setup, plan, predicted


def _run(args, cfg, setup, plan, predicted) -> int:
    """Join, run this process's part of the plan; rank 0 gathers the timelines and writes the Result."""
    import torch.distributed as dist

    from hpipe.result import Result
    from hpipe.runtime.launcher import measured_result, run_from_records
    from hpipe.runtime.worker import worker_main

    spec, stages, ids = cfg.spec, cfg.stages, cfg.ids
    rec, code = worker_main(cfg), 0
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(rec, gathered, dst=0)
    if dist.get_rank() == 0:
        records = {r["role"]: r for r in gathered}
        run = run_from_records(records, plan.devices, stages, ids)
        measured = measured_result(setup, plan, run, check=args.check, spec=spec, seed=args.seed)
        measured.take_prediction(predicted)
        from hpipe.runtime.emulation import slowed_by_quota

        quota = [d for d in plan.devices if slowed_by_quota(setup.cluster.device(d).placement)]
        if quota:  # torchrun places each worker on its host as it is, without cgroups or a duty cycle
            measured.not_emulated = [f"CPU quotas not applied (torchrun runs every worker unthrottled): "
                                     f"{', '.join(quota)}"]
        text = Result(scenario=setup.name, mode="measured", results=[measured],
                      cost_model=setup.cost.describe()).model_dump_json(indent=2)
        if args.json_path:
            from hpipe.io import write_text

            write_text(args.json_path, text, make_parents=False)
        else:
            print(json.dumps({"latency_s": measured.latency_s, "next_token_ids": measured.next_token_ids,
                              "max_abs_error": measured.max_abs_error, "generated_ids": measured.generated_ids}))
        if args.check:  # as `hpipe execute --check`: exit 1 past the tolerance (the Result is written either way)
            from hpipe.runtime.launcher import check_verdict

            passed, figures = check_verdict(setup, measured)
            print(f"hpipe: --check {'passed' if passed else 'failed'}: {figures}", file=sys.stderr)
            if not passed:
                code = 1
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
