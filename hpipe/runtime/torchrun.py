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
it is ready (``_Meeting``): one that refuses its input (a ``--host`` not in the scenario, a plan
that does not fit after its ``--set``) is named to all within a second, where its peers had
waited out the 600 s startup timeout in ``init_process_group`` with an error naming no host.
Every receive is bounded by ``--timeout`` (a decode stream's first of each group, which waits out
the rest of the prefill, by ``--timeout`` per work item per stage); there is no launcher above the
workers here, so a host that dies is noticed by its peers' timeouts and by torchrun, which then
stops the others.
A host that never starts is torchrun's to notice: its rendezvous times out (600 s in torch
2.13; ``--rdzv-conf=timeout=S`` before ``-m`` sets another).
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

STORE_TIMEOUT_S = 15
"""How long a store operation of the meeting may take: node 0's torchrun, which holds the store,
answers at once while it runs; gone (its host stopped), the client's connect would retry for
minutes under torch's default."""
MEET_PREFIX = "hpipe/meet/"
"""Keys of ``_Meeting`` on torchrun's store (the agent's, which every worker reaches)."""


class _Once(argparse.Action):
    """A one-value option given at most once: argparse keeps the last of ``--planner a
    --planner b`` without a word (``hpipe``'s own commands refuse it too, cli.common._OnceCommand)."""

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
              + "".join(f" --{name} {getattr(args, name)}" for name in ("seed", "warmup", "timeout")
                        if getattr(args, name) != getattr(defaults, name)))
    rank0 = f" --json {shlex.quote(args.json_path or 'result.json')}" + (" --check" if args.check else "")
    lines = []
    for node_rank, (host, n) in enumerate(sorted(per_host.items(), key=lambda kv: kv[0] != first_host)):
        lines.append(f"# on {host} ({addresses.get(host) or 'address not given'}):\n"
                     f"torchrun --nnodes={len(per_host)} --node-rank={node_rank} --nproc-per-node={n} "
                     f"--master-addr={master} --master-port={args.master_port} "
                     f"-m hpipe.runtime.torchrun {shlex.quote(args.scenario)} {shared} --host {host}"
                     + (rank0 if node_rank == 0 else ""))
    return lines


class _Meeting:
    """The processes' meeting on torchrun's store before ``init_process_group``: each posts that it
    started (before it plans), then that it is ready or why it refused; all wait until every one
    has said.  A refusal stops every process at once, naming the host and with its exit code.
    (One that refused before ``init_process_group`` had left its peers waiting there for the
    whole startup timeout, 600 s, to fail naming no host.)

    The store is the one torchrun's agent on node 0 hosts for its workers
    (``TORCHELASTIC_USE_AGENT_STORE``); where torchrun gives none, there is no meeting and the
    processes meet in ``init_process_group`` as before.  Keys are per restart of the run."""

    LINGER_S = 120.0
    """How long a refusing process on node 0 waits for its peers to read the refusal: its exit
    ends node 0's agent, and the store with it."""
    START_WAIT_S = 120.0
    """The least time a peer has to say it started (torch's import on a loaded host): one silent
    longer failed before it could say why (its host's output says)."""

    def __init__(self):
        self.active = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "MASTER_PORT" in os.environ
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        self._store = None

    def _call(self, what, *a):
        """A store operation; the store gone (node 0's torchrun stopped) is one line, not a traceback."""
        from hpipe.errors import WorkerError

        try:
            if self._store is None:
                from datetime import timedelta

                import torch.distributed as dist

                prefix = f"{MEET_PREFIX}{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
                self._store = dist.PrefixStore(prefix, dist.TCPStore(
                    os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                    timeout=timedelta(seconds=STORE_TIMEOUT_S)))
            return getattr(self._store, what)(*a)
        except Exception as e:
            raise WorkerError(f"torchrun's store at {self.where} is gone or unreachable (node 0's torchrun "
                              f"stopped? see its output): {str(e).strip().splitlines()[0] if str(e).strip() else e}") from e

    def _said(self, r: int):
        """Rank r's ready/refusal post, or None where it has posted nothing (ready is JSON null:
        posted, so "ready" is returned for it)."""
        if not self._call("check", [f"ready/{r}"]):
            return None
        return json.loads(self._call("get", f"ready/{r}")) or "ready"

    def started(self) -> None:
        if self.active:
            self._call("set", f"started/{self.rank}", "1")

    def refuse(self, host: str | None, refusal: BaseException) -> None:
        """Post this process's refusal; on node 0, but for Ctrl-C, wait (``LINGER_S`` at most)
        until every peer has read it or refused too."""
        from hpipe.errors import HpipeError

        if not self.active:
            return
        code = (refusal.code if isinstance(refusal, SystemExit) else 130 if isinstance(refusal, KeyboardInterrupt)
                else getattr(refusal, "exit_code", 1))
        message = (str(refusal) if isinstance(refusal, HpipeError) else
                   "its command line was refused (see that host's output)" if isinstance(refusal, SystemExit) else
                   "interrupted" if isinstance(refusal, KeyboardInterrupt) else f"{type(refusal).__name__}: {refusal}")
        self._call("set", f"ready/{self.rank}", json.dumps(
            {"host": host or "(no --host)", "exit_code": code if isinstance(code, int) else 1, "message": message}))
        if os.environ.get("GROUP_RANK", "0") != "0" or isinstance(refusal, KeyboardInterrupt):
            return  # (Ctrl-C leaves at once: a peer then finds the store gone, said in one line)
        deadline = time.monotonic() + self.LINGER_S
        while time.monotonic() < deadline:
            if all(isinstance(self._said(r), dict) or self._call("check", [f"seen/{r}"])
                   for r in range(self.world) if r != self.rank):
                return
            time.sleep(0.05)

    def meet(self, host: str | None, start_wait_s: float, ready_wait_s: float) -> None:
        """Post ready and wait for every peer: raise the first refusal (and say it was seen);
        a peer silent past ``start_wait_s`` (not even started) or not ready past ``ready_wait_s``
        is a WorkerError.  Ctrl-C while waiting is posted as this process's refusal."""
        from hpipe.errors import HpipeError, WorkerError

        if not self.active:
            return
        self._call("set", f"ready/{self.rank}", json.dumps(None))
        start, said = time.monotonic(), {}
        try:
            while True:
                for r in range(self.world):
                    if r not in said:
                        got = self._said(r)
                        if got is not None:
                            said[r] = got
                refused = sorted((r, v) for r, v in said.items() if isinstance(v, dict))
                if refused:
                    r, v = refused[0]
                    self._call("set", f"seen/{self.rank}", "1")
                    err = HpipeError(f"host {v['host']} (rank {r}) refused, so this one stops too: {v['message']}")
                    err.exit_code = v["exit_code"]
                    raise err
                if len(said) == self.world:
                    return
                waited = time.monotonic() - start
                silent = [r for r in range(self.world) if r not in said and not self._call("check", [f"started/{r}"])]
                wait = max(start_wait_s, self.START_WAIT_S)
                if silent and waited > wait:
                    raise WorkerError(f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} did not "
                                      f"start within {wait:g} s: failed before it could say why; see that host's "
                                      f"output")
                if waited > ready_wait_s:
                    late = sorted(set(range(self.world)) - set(said))
                    raise WorkerError(f"rank{'s' if len(late) > 1 else ''} {', '.join(map(str, late))} not ready "
                                      f"after {ready_wait_s:g} s")
                time.sleep(0.05)
        except KeyboardInterrupt as e:
            with contextlib.suppress(Exception):
                self.refuse(host, e)
            raise


def main(argv=None) -> int:
    from hpipe.errors import HpipeError

    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # a command line refused on one host under torchrun: its peers stop too
        if e.code and "LOCAL_RANK" in os.environ:
            argv = sys.argv[1:] if argv is None else argv
            host = next((b for a, b in zip(argv, argv[1:]) if a == "--host"), None)
            with contextlib.suppress(Exception):
                _Meeting().refuse(host, e)
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
    meeting = _Meeting()
    meeting.started()
    try:
        cfg, setup, plan, predicted = _prepare(args)
    except (Exception, KeyboardInterrupt) as e:  # said to the peers, which stop too
        with contextlib.suppress(Exception):  # a store gone is not this process's error
            meeting.refuse(args.host, e)
        raise
    meeting.meet(args.host, start_wait_s=args.timeout, ready_wait_s=cfg.startup_timeout_s)
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
    if os.environ.get("GROUP_RANK", os.environ.get("RANK", "0")) != "0" and (args.json_path or args.check):
        print(f"hpipe: --json and --check are global rank 0's, on node 0, not this host's ({args.host}, node "
              f"{os.environ.get('GROUP_RANK')}): give them on node 0's command", file=sys.stderr)
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
