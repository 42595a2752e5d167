"""Sizing of the engine pools' batches in flight (no Ray, no engine)."""
import logging

from grm_ray.config import JobConfig
from grm_ray.pipeline import warn_if_underfed


def test_defaults_put_hundreds_of_sequences_in_flight():
    cfg = JobConfig()
    assert cfg.batch_size * cfg.k * cfg.max_batches_in_flight >= 1024  # vLLM's largest default max_num_seqs


def test_warns_when_batches_in_flight_cannot_fill_the_engine(caplog):
    caplog.set_level(logging.WARNING)
    assert warn_if_underfed(JobConfig(batch_size=4, k=8, max_batches_in_flight=2), 256, "GRMSampler")
    assert "at most 64 sequences in flight" in caplog.text and "max_num_seqs 256" in caplog.text
    assert not warn_if_underfed(JobConfig(batch_size=32, k=8, max_batches_in_flight=1), 256, "GRMSampler")
    assert not warn_if_underfed(JobConfig(), None, "GRMSampler")  # a server engine: nothing to compare with
