"""Operations: Prometheus metrics, ``netid top``, the ID-card registry import."""
