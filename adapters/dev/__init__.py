"""Development only: embedded PostgreSQL, Redis and Kafka servers, the sandbox processors and the
test identity verifier. The embedded servers' packages come with the `embedded` extra; a
production install leaves them out and gives every server by URL.
"""
