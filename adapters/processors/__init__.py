"""Payment processors: the HTTP client behind the PaymentProcessor port, its circuit breaker and
failover, and the resolver that settles unknown outcomes.
"""
