"""The Kafka log driver (confluent-kafka / librdkafka), for meshes that outgrow one machine.

librdkafka calls block or call back on their own threads, so nothing here runs on the event loop
except ``produce`` (it only queues). Threads, and why:

- one producer thread polls the producer so delivery reports arrive as soon as the broker acks;
  each report completes the ``append`` future on the loop. Appends are never awaited one by one.
- one tail thread owns one assigned (group-less) consumer shared by every ``read`` and
  ``read_range`` of this ``KafkaLog``: a gateway tailing hundreds of turns costs one consumer,
  not hundreds. A new reader that starts before the shared position of its partition rewinds
  it; readers ignore records below their own position.
- each group member owns a consumer and a thread that keeps polling even while the caller works
  on a record for minutes, so rebalances complete and heartbeats flow; records are prefetched a
  little and the partitions are paused when the caller falls behind.

Modules, one job each:

- ``client``: what every librdkafka client here shares (settings, the clients of a started log,
  message conversion, batch polling).
- ``admin``: topics, partition counts and end offsets (the admin client).
- ``offsets``: a group's committed offsets (a consumer of the group that never joins it).
- ``producer``: ``append`` and the producer thread.
- ``fetcher``: ``read`` and ``read_range`` on the shared tail consumer and its thread.
- ``group``: a consumer-group member, its consumer and its thread.
- ``log``: ``KafkaLog``, which starts, wires and stops the others.
"""

from mesh.log.kafka.log import KafkaLog

__all__ = ["KafkaLog"]
