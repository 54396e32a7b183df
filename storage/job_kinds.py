"""The names of the job kinds in the queue and their deduplication keys, in one place.

Whoever enqueues a job and whoever handles it (registered by the composition root) both refer
to these names; a key makes enqueueing the same work twice a no-op.
"""

from __future__ import annotations

#: A received instance to analyse (enqueued by the Storage SCP with the instance).
INFER_JOB = "infer"
#: A result to send somewhere (the outbox, :mod:`storage.outbox`).
DELIVER_JOB = "deliver"
#: A study to (re-)aggregate once it is quiet (:mod:`storage.study_results`).
STUDY_RESULT_JOB = "study-result"
#: A study whose images or results changed: refresh what is published about it (the FHIR
#: resources, :mod:`fhir_api.projection`). Debounced per study like ``study-result``.
STUDY_CHANGED_JOB = "study-changed"


def infer_job_key(sop_instance_uid: str) -> str:
    return f"{INFER_JOB}:{sop_instance_uid}"


def study_result_key(study_instance_uid: str) -> str:
    return f"{STUDY_RESULT_JOB}:{study_instance_uid}"


def study_changed_key(study_instance_uid: str) -> str:
    return f"{STUDY_CHANGED_JOB}:{study_instance_uid}"


def delivery_key(channel: str, destination: str, subject: str) -> str:
    """One delivery per (channel, destination, subject)."""
    return f"{DELIVER_JOB}:{channel}:{destination}:{subject}"
