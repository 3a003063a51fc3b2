"""Deciding, before anything runs, which stages of a dataset are stale and why.

A stage is *fresh* when its lock holds today's fingerprint and no present output differs from
the lock; downstream of a stale or forced stage everything is stale. Missing outputs of a
fresh stage are fine: Snakemake rebuilds them only when a consumer must run.

Today's fingerprint comes from the same :func:`loramill.reruns.fingerprints.components` the
job uses, with the rule's params evaluated for the dataset and each produced input taken from its
producer's lock. A dataset without a lock for a stage (renamed, say) takes over another
dataset's lock when the fingerprints agree, with its outputs from the run-cache.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loramill import LoramillError
from loramill.hashing import HashCache
from loramill.reruns import run_cache
from loramill.reruns.explain import explain
from loramill.reruns.fingerprints import Job, components, fingerprint
from loramill.reruns.locks import lock_path, locks_of, read_lock, write_lock

log = logging.getLogger("loramill")


@dataclass(frozen=True)
class Stage:
    """A content-keyed rule, as seen for one dataset at a time."""

    name: str
    job: Callable[[str], Job]  # dataset → what its job will receive
    outputs: Callable[[str], dict[str, str]]  # dataset → named outputs (markers excluded)
    # dataset → whether it runs the stage at all (rule validate: only validated datasets)
    applies: Callable[[str], bool] = lambda ds: True


@dataclass
class Verdict:
    stage: str
    dataset: str
    reasons: list[str] = field(default_factory=list)
    lock: dict[str, Any] | None = None
    upstream: list[str] = field(default_factory=list)  # the stages whose outputs it reads
    # (dataset, stage) of another dataset whose outputs it reads (a validation folder's)
    linked: list[tuple[str, str]] = field(default_factory=list)

    @property
    def fresh(self) -> bool:
        return not self.reasons

    def line(self) -> str:
        return f"{self.stage} {self.dataset}: {'; '.join(self.reasons)}"


def digests(outputs: dict[str, str], hashes: HashCache) -> dict[str, str]:
    """One hash per existing output (a folder hashes as its manifest)."""
    return {name: hashes.digest(path) for name, path in outputs.items() if os.path.exists(path)}


# Other datasets a dataset reads from: each one's planner and its verdicts.
Linked = dict[str, tuple["Planner", dict[str, Verdict]]]


class Planner:
    """Verdicts for every stage of a dataset, in stage order."""

    def __init__(self, stages: list[Stage], hashes: HashCache, forced: set[str]) -> None:
        self.stages, self.hashes = stages, hashes
        self.forced = forced  # what --forcerun names: rules or output files

    def of(self, ds: str) -> list[Stage]:
        """The stages ``ds`` runs."""
        return [stage for stage in self.stages if stage.applies(ds)]

    def producers(self, ds: str) -> dict[str, tuple[str, str]]:
        """Which stage makes which path: ``{path: (stage, output name)}``."""
        made = {}
        for stage in self.of(ds):
            made.update({path: (stage.name, name) for name, path in stage.outputs(ds).items()})
        return made

    def ordered(self, ds: str, made: dict) -> list[tuple[Stage, Job, set[str]]]:
        """Each stage with its job and the stages it reads from, producers first whatever
        order the rules were defined (or the Snakefile's includes written) in."""
        jobs = [(stage, stage.job(ds)) for stage in self.of(ds)]
        reads = {
            stage.name: {made[p][0] for paths in job.inputs.values() for p in paths if p in made}
            - {stage.name}
            for stage, job in jobs
        }
        order: list[tuple[Stage, Job, set[str]]] = []
        while len(order) < len(jobs):
            placed = {stage.name for stage, _, _ in order}
            ready = [(s, j) for s, j in jobs if s.name not in placed and reads[s.name] <= placed]
            if not ready:
                circle = sorted(set(reads) - placed)
                raise LoramillError(f"stages read each other's outputs in a circle: {circle}")
            order.append((*ready[0], reads[ready[0][0].name]))
        return order

    def plan(self, ds: str, linked: Linked | None = None) -> dict[str, Verdict]:
        """``linked``: datasets whose outputs ``ds`` reads (its validation folder's entry),
        each with its planner and verdicts: a stale one makes its readers stale."""
        linked = linked or {}
        made, verdicts = self.producers(ds), {}
        foreign = {
            path: (other, *made_by)
            for other, (planner, _) in linked.items()
            for path, made_by in planner.producers(other).items()
        }
        found = (verdicts, made, foreign, linked)
        recorded = lambda name, path: self.recorded(*found, path)  # noqa: E731
        for stage, job, read in self.ordered(ds, made):
            verdict = verdicts[stage.name] = Verdict(stage.name, ds)
            verdict.upstream = sorted(read)
            paths = [p for listed in job.inputs.values() for p in listed if p in foreign]
            verdict.linked = sorted({foreign[p][:2] for p in paths})
            after = [u for u in verdict.upstream if not verdicts[u].fresh]
            after += [f"{s} {o}" for o, s in verdict.linked if not linked[o][1][s].fresh]
            if self.forced & {stage.name, *stage.outputs(ds).values()}:  # -R rule or file
                verdict.reasons.append("forced (--forcerun)")
            elif after:
                verdict.reasons.append(f"after {', '.join(after)}")
            else:
                self.judge(verdict, stage, job, recorded)
        return verdicts

    def judge(self, verdict: Verdict, stage: Stage, job: Job, produced: Callable) -> None:
        parts = components(job, produced, self.hashes)
        today = fingerprint(parts)
        ds, outputs = verdict.dataset, stage.outputs(verdict.dataset)
        lock, why = read_lock(ds, stage.name), "outputs were missing"
        if lock is None:
            lock, why = self.adopt(ds, stage, today, parts)
        verdict.lock = lock
        if lock is None:
            exists = lock_path(ds, stage.name).exists()
            verdict.reasons.append("lock unusable" if exists else "never built")
        elif lock["fingerprint"] != today:
            verdict.reasons.extend(explain(lock["components"], parts))
        elif any(lock["outputs"].get(k) != v for k, v in digests(outputs, self.hashes).items()):
            verdict.reasons.append("outputs differ from the lock (edited by hand?)")
        else:
            # Fresh. Outputs gone (a renamed dataset, a cleaned results/) come back from the
            # run-cache now, or Snakemake would rerun the stage for a consumer that needs them.
            # Said, or "Nothing to be done" would hide that files changed.
            missing = {k: p for k, p in outputs.items() if not os.path.exists(p)}
            if missing and run_cache.restore(today, missing):
                paths = ", ".join(p for p in missing.values() if os.path.lexists(p))
                log.warning(
                    "restored: %s %s from the run-cache (%s): %s", stage.name, ds, why, paths
                )

    def adopt(
        self, ds: str, stage: Stage, today: str, parts: dict
    ) -> tuple[dict[str, Any] | None, str]:
        """Take over the lock of another dataset built from the same fingerprint (what a
        renamed dataset finds under its old name), its outputs going into the run-cache.
        Returns the lock and, for the restore message, whose it was."""
        for other, path in locks_of(stage.name).items():
            lock = read_lock(other, stage.name) if other != ds and path.exists() else None
            if lock is None or lock["fingerprint"] != today:
                continue
            theirs = stage.outputs(other)
            if digests(theirs, self.hashes) == lock["outputs"]:
                run_cache.store(today, theirs)
            write_lock(ds, stage.name, today, parts, lock["outputs"])
            names = (stage.name, ds, other)
            log.warning("loramill: %s %s: built as %s before; took over its results", *names)
            return lock, f"same inputs as {other}"
        return None, ""

    def recorded(
        self, verdicts: dict[str, Verdict], made: dict, foreign: dict, linked: Linked, path: str
    ) -> str:
        """A produced input's hash as its (fresh) producer's lock records it, a linked
        dataset's too; any other input file by its content, as the job will see it."""
        if path in foreign:
            other, producer, name = foreign[path]
            lock = linked[other][1][producer].lock or {}
        elif path in made:
            producer, name = made[path]
            lock = verdicts[producer].lock or {}
        else:
            return self.hashes.digest(path) if os.path.exists(path) else "missing"
        return lock.get("outputs", {}).get(name, "missing")
