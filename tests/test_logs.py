"""Service logs: JSON lines, and grpc's error for a status sent to a client
that had already cancelled is not reported as one."""

from __future__ import annotations

import json
import logging

import pytest
from grpc._cython import cygrpc

from dsi.serving.logs import setup_logging


@pytest.fixture
def service_logging():
    """The services' logging set up for a test, the test runner's put back after."""
    root, grpc_log = logging.getLogger(), logging.getLogger("grpc._cython.cygrpc")
    saved = root.handlers[:], root.level, grpc_log.filters[:]
    yield setup_logging
    root.handlers[:], grpc_log.filters[:] = saved[0], saved[2]
    root.setLevel(saved[1])


def log_batch_error(ops: str) -> None:
    try:
        raise cygrpc.ExecuteBatchError(f'Failed "execute_batch": ({ops},)')
    except cygrpc.ExecuteBatchError:
        logging.getLogger("grpc._cython.cygrpc").exception("ExecuteBatchError raised in core by servicer method")


def test_a_status_sent_to_a_client_that_cancelled_is_a_debug_record_not_an_error(service_logging, capsys):
    service_logging("info")
    log_batch_error("<grpc._cython.cygrpc.SendStatusFromServerOperation object at 0x7fe16548a9b0>")
    assert capsys.readouterr().err == ""  # a finished handler's client had cancelled: nothing to report
    log_batch_error("<grpc._cython.cygrpc.SendMessageOperation object at 0x7fe16548a9b0>")
    (line,) = capsys.readouterr().err.splitlines()  # anything else stays an error, with its traceback
    record = json.loads(line)
    assert record["level"] == "error" and "SendMessageOperation" in record["exc"]
    service_logging("debug")
    log_batch_error("<grpc._cython.cygrpc.SendStatusFromServerOperation object at 0x1>")
    (line,) = capsys.readouterr().err.splitlines()
    record = json.loads(line)
    assert record["level"] == "debug" and "exc" not in record
    assert len(logging.getLogger("grpc._cython.cygrpc").filters) == 1  # set up twice, filtered once
