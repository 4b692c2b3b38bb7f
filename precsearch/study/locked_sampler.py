"""An Optuna sampler that computes its next plan holding the machine's CPU lock shared.

With ``--workers N`` a worker's sampler (a Gaussian-process fit takes seconds of
both cores) ran outside the :class:`~precsearch.measure.CpuLock`, so it could
overlap another worker's timing and slow it by a scheduler time slice per parallel
region.  Holding the lock shared, as a build does, makes a timing wait for the
sampler and the sampler wait for a timing.  Optuna has no hook around a sampler's
work, so this wraps the sampler, as Optuna's own ``PartialFixedSampler`` wraps its
base sampler: every call is passed on unchanged.
"""

from __future__ import annotations

import optuna

from precsearch.measure import held_shared


class CpuLockedSampler(optuna.samplers.BaseSampler):
    """``sampler`` whose sampling calls hold ``lock.shared()``; everything else passed through.

    Parameters
    ----------
    sampler : optuna.samplers.BaseSampler
    lock : object with a ``shared()`` context manager (a :class:`~precsearch.measure.CpuLock`), or None
    """

    def __init__(self, sampler: optuna.samplers.BaseSampler, lock):
        self.sampler = sampler
        self.lock = lock

    def infer_relative_search_space(self, study, trial):
        return self.sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        with held_shared(self.lock):
            return self.sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        with held_shared(self.lock):
            return self.sampler.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self.sampler.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()

    def __repr__(self) -> str:
        return f"CpuLockedSampler({self.sampler!r})"
