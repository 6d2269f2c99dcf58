"""The package's log reaches detectron2's handlers once, never twice (issue 13, item 11 follow-up).

detectron2's ``setup_logger`` stops its loggers propagating so that an application which also configures
the root logger does not print every line twice. Routing the ``model_quantization`` logger to detectron2's
handlers while leaving it propagating did exactly that: with the same (or any) handler on the root logger,
each record was handled twice (pytest's session-wide capture handler sits on both, and CI failed on it).
"""

from __future__ import annotations

import logging

import pytest

from model_quantization.detectron2.logs import PACKAGE_LOGGER, route_to_detectron2_log


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def loggers():
    """detectron2's, ours and the root logger, restored exactly afterwards."""
    names = ["detectron2", PACKAGE_LOGGER, None]
    saved = [(lg, list(lg.handlers), lg.propagate, lg.level) for lg in map(logging.getLogger, names)]
    yield [logging.getLogger(n) for n in names]
    for lg, handlers, propagate, level in saved:
        lg.handlers[:] = handlers
        lg.propagate, lg.level = propagate, level


def test_a_record_reaches_a_handler_shared_by_detectron2_and_root_once(loggers) -> None:
    detectron2, ours, root = loggers
    shared = _Collect()
    detectron2.handlers[:] = [shared]
    detectron2.propagate = False  # what detectron2's setup_logger does
    root.addHandler(shared)  # e.g. an application's logging.basicConfig, or pytest's capture
    route_to_detectron2_log()
    logging.getLogger(f"{PACKAGE_LOGGER}.quantizers.base").warning("dead input in 'head.conv3'")
    assert [r.getMessage() for r in shared.records] == ["dead input in 'head.conv3'"]


def test_routing_twice_adds_nothing_and_info_is_not_dropped(loggers) -> None:
    detectron2, ours, _ = loggers
    console = _Collect()
    detectron2.handlers[:] = [console]
    detectron2.propagate = False
    ours.handlers[:] = []
    ours.setLevel(logging.NOTSET)
    route_to_detectron2_log()
    route_to_detectron2_log()  # the model is built again for evaluation
    assert ours.handlers == [console]
    logging.getLogger(f"{PACKAGE_LOGGER}.detectron2.modeling").info("report")
    assert [r.getMessage() for r in console.records] == ["report"]


def test_without_detectron2_handlers_nothing_changes(loggers) -> None:
    detectron2, ours, _ = loggers
    detectron2.handlers[:] = []
    before = (list(ours.handlers), ours.propagate)
    route_to_detectron2_log()
    assert (list(ours.handlers), ours.propagate) == before
