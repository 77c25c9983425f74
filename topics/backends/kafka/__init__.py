"""The Kafka backend (kafka-python): `open_log("kafka://HOST:PORT[,HOST:PORT]")`.

    options.py   raw client settings, typed and split per client
    admin.py     topics (create, check partition counts) and consumer groups
    producer.py  batched idempotent producer with a client-side size limit
    consumer.py  consumer-group member, rebalance callbacks off the IO thread
    reader.py    group-less reads up to the high watermark
    log.py       KafkaLog, the Log interface over the above
"""

from topics.backends.kafka.log import KafkaLog

__all__ = ["KafkaLog"]
