"""The gateway: the I/O shell around the ingest pipeline.

It owns everything that talks to the outside on the server side: the aiohttp application
(API, pages, /healthz, /metrics), the MQTT consumer that takes signed envelopes from the
broker with manual acknowledgement, the private broker runner used by tests and the demo,
and the ``trialstream`` command line with its one frozen ``Settings``. Decisions about data
are not made here: they are made by the sans-I/O stages in ``ingest`` and ``consent`` and
stored by ``storage``.
"""
