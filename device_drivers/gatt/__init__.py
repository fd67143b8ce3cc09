"""Pure decoders for the standard GATT health profiles (bytes in, typed readings out)."""
