"""The TCP server: accepting connections, one connection's reader and writer, connection limits."""
