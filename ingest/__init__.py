"""The sans-I/O ingest pipeline and the envelope protocol.

Every stage (decode, verify, dedupe, consent, plausibility, rules) takes plain values (the
envelope bytes, a key lookup, a consent snapshot, "now") and returns accepted readings plus
rejections with a reason code. Nothing here opens a socket, reads a clock or touches the
database: the gateway does the I/O and calls in. The envelope codec (COSE_Sign1 over CBOR,
normative in docs/protocol.md) lives here too, because both the hub that seals and the
gateway that opens must agree on it byte for byte.
"""
