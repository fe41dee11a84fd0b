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

Every receive is bounded by ``--timeout``; there is no launcher above the
workers here, so a host that dies is noticed by its peers' timeouts and by
torchrun, which then stops the others.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections import Counter


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
    """One torchrun command line per host that holds plan devices."""
    per_host = Counter(d.split("/", 1)[0] for d in plan.devices)
    first_host = plan.devices[0].split("/", 1)[0]
    addresses = {h.name: h.address for h in setup.scenario.cluster.hosts}
    master = args.master_addr or addresses.get(first_host) or "127.0.0.1"
    which = (f"--plan {shlex.quote(args.plan)}" if args.plan else f"--planner {plan.planner}") + _sets(args)
    lines = []
    for node_rank, (host, n) in enumerate(sorted(per_host.items(), key=lambda kv: kv[0] != first_host)):
        lines.append(f"# on {host} ({addresses.get(host) or 'address not given'}):\n"
                     f"torchrun --nnodes={len(per_host)} --node-rank={node_rank} --nproc-per-node={n} "
                     f"--master-addr={master} --master-port={args.master_port} "
                     f"-m hpipe.runtime.torchrun {shlex.quote(args.scenario)} {which} --host {host}"
                     + (" --json result.json" if node_rank == 0 else ""))
    return lines


def main(argv=None) -> int:
    from hpipe.errors import HpipeError

    args = _parser().parse_args(argv)
    try:
        return _main(args)
    except HpipeError as e:
        print(f"hpipe: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C reaches every worker of the host: one line each, not a traceback
        print("hpipe: interrupted", file=sys.stderr)
        return 130


def _main(args) -> int:
    from hpipe.errors import InputError
    from hpipe.scenario import load_scenario

    setup = load_scenario(args.scenario, overrides=args.sets).resolve()
    if args.json_path and not args.commands:  # before any work (planning too), as `hpipe execute` checks it
        from pathlib import Path

        from hpipe.io import check_outputs

        check_outputs({"--json": args.json_path}, inputs={"the scenario file": Path(args.scenario),
                                                          "--plan": Path(args.plan) if args.plan else None,
                                                          **setup.scenario.files_read()})
    plan = _plan(setup, args)
    if args.commands:
        print("\n".join(commands(setup, plan, args)))
        if not args.plan:  # each host would plan for itself: one plan file for all is safer
            sets = _sets(args)
            print(f"hpipe: every host plans for itself with --planner {plan.planner}; hosts whose hpipe "
                  f"differs may plan differently (and refuse). For one plan on all: hpipe plan "
                  f"{shlex.quote(args.scenario)} --planner {plan.planner}{sets} -o plan.json, copy it to "
                  f"every host, and print these with --plan plan.json{sets}", file=sys.stderr)
        return 0
    from hpipe.errors import InfeasibleError
    from hpipe.sim import simulate

    predicted = simulate(setup, plan)  # every process alike: all refuse a plan that does not fit, as execute does
    if not predicted.feasible:
        raise InfeasibleError(f"plan does not fit: {predicted.infeasible}")
    if not args.host:
        raise InputError("--host is required: the scenario host this process runs on", field="--host")
    if "LOCAL_RANK" not in os.environ:
        raise InputError("not started by torchrun (LOCAL_RANK is unset); see --commands", field="--host")

    import torch.distributed as dist

    from hpipe.result import Result
    from hpipe.runtime.launcher import (backend_for, item_codecs, load_inputs, make_ids, measured_result,
                                        placement_of, run_from_records, runtime_spec, stage_roles)
    from hpipe.runtime.worker import WorkerConfig, worker_main

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
