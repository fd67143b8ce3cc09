"""Pure decoders for the standard GATT health profiles (bytes in, typed readings out).

One module per profile, each with ``decode`` (bytes -> frozen dataclass), ``encode`` (the
inverse, used by the virtual wearables and to write a wearable's clock) and
``measurements`` (decoded value -> canonical :class:`~device_drivers.gatt.base.Measurement`
list, in the units of DESIGN.md "Metrics and units"):

- ``heart_rate`` 0x2A37; ``temperature`` 0x2A1C / 0x2A1E; ``blood_pressure`` 0x2A35 /
  0x2A36; ``pulse_oximeter`` 0x2A5E / 0x2A5F; ``glucose`` 0x2A18 / 0x2A34;
  ``weight_scale`` 0x2A9D; ``body_composition`` 0x2A9C; ``battery`` 0x2A19;
  ``current_time`` 0x2A2B; ``device_information`` 0x2A24..0x2A29; ``date_time`` 0x2A08.
- ``ieee11073``: SFLOAT / FLOAT with their special values (never a reading).
- ``registry``: UUID -> (name, decode, measurements), service UUIDs, id parsing.
- ``cli``: ``run_decode`` behind ``trialstream decode``.

Bad data raises :class:`~device_drivers.gatt.errors.MalformedPayload` (characteristic and
offset); values a wire format cannot carry raise ``EncodeError``. No I/O, no clock.
"""
