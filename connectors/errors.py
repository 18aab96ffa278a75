"""Errors of the connectors, under the engine's ``PloyError`` root.

    PloyError
    └── ConnectorError            a connector cannot go on (names the connector)
        ├── DeliveryError         Kafka did not acknowledge a produced record
        └── ArchiveError          an archive directory that cannot be restored
            └── TopicNotEmptyError  restore into a topic that already holds events

Records that cannot become a trigger (bad JSON, not a CloudEvent, unknown
Avro schema, input the workflow's model rejects) are not errors of the
connector: they go to the dead-letter topic with the reason in a header.
"""

from __future__ import annotations

from engine.errors import PloyError


class ConnectorError(PloyError):
    """A connector cannot go on."""

    def __init__(self, connector: str, problem: str):
        self.connector, self.problem = connector, problem
        super().__init__(f"{connector}: {problem}")


class DeliveryError(ConnectorError):
    """Kafka did not acknowledge a record within the wait (the work is repeated)."""


class ArchiveError(ConnectorError):
    """An archive directory that cannot be restored as it is."""

    def __init__(self, directory: str, problem: str):
        self.directory = directory
        super().__init__(f"archive {directory}", problem)


class TopicNotEmptyError(ArchiveError):
    """Restoring would mix the archive with events the topic already holds."""

    def __init__(self, directory: str, topic: str, partition: int):
        self.topic, self.partition = topic, partition
        super().__init__(directory, f"topic '{topic}' is not empty (partition {partition} holds "
                         "events); restore only into an empty topic (a fresh prefix or broker)")
