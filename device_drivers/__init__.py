"""The hub side: Bluetooth wearables in, signed envelopes out.

``device_drivers.gatt`` holds pure parsers, one module per standard GATT health profile
(bytes in, frozen dataclasses out, one typed ``MalformedPayload`` error). The drivers talk
to wearables through bleak; ``device_drivers.sim`` gives bleak a backend over bumble's
virtual controllers and serves virtual wearables, so tests and the demo run real GATT
without hardware. The hub keeps every reading in a durable outbox before anything else,
seals batches into signed envelopes and relays them over MQTT until the gateway's receipt
arrives.
"""
