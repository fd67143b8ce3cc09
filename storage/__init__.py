"""PostgreSQL and TimescaleDB: schema, migrations and the bulk writer.

The schema is applied by numbered SQL migrations recorded in a migrations table. When
``CREATE EXTENSION timescaledb`` works, ``readings`` is a compressed hypertable; otherwise it
is a natively range-partitioned table whose partitions the code creates ahead of time, and
the project reports which mode it runs in. The bulk writer stores one batch of envelopes per
transaction: envelopes deduplicated by their primary key, readings by binary COPY, and a
rejection row for everything that is not stored.
"""
