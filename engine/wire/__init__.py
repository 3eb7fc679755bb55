"""The wire: MessagePack messages and their limits, framing, and the client library."""
