"""ploy-engine: durable workflows for Python, event-sourced on Kafka.

The public API, re-exported here; everything else is machinery.
"""

from engine.app import Engine, load_app
from engine.bindings import Env, TriggerResult, WorkflowBinding
from engine.builder import Ploy, Worker, ploy
from engine.clock import Clock, ManualClock
from engine.config import Config, load_config
from engine.context import Context, Step
from engine.durations import parse_duration
from engine.errors import (
    ConfigError,
    InvalidInputError,
    NonRetryableError,
    PloyError,
    StepFailedError,
    StepTimeoutError,
    UnknownBindingError,
)
from engine.http import RequestContext
from engine.models import Attempt, Execution, ExecutionStatus, LogEntry, StepRecord

__all__ = [
    "Attempt",
    "Clock",
    "Config",
    "ConfigError",
    "Context",
    "Engine",
    "Env",
    "Execution",
    "ExecutionStatus",
    "InvalidInputError",
    "LogEntry",
    "ManualClock",
    "NonRetryableError",
    "Ploy",
    "PloyError",
    "RequestContext",
    "Step",
    "StepFailedError",
    "StepRecord",
    "StepTimeoutError",
    "TriggerResult",
    "UnknownBindingError",
    "Worker",
    "WorkflowBinding",
    "load_app",
    "load_config",
    "parse_duration",
    "ploy",
]
