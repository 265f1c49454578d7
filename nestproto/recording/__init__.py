# -*- test-case-name: tests.test_fixtures,tests.test_replay_all -*-
"""
Fixtures: recorded exchanges between a thermostat (and its user) and
nestproto, and the replayer that checks a server against them.

A fixture file is JSON lines (fixtures/README.rst has the format). The
L{recorder.Recorder} writes them from a live server by wrapping its
resources; the L{replayer.Replayer} plays them against a fresh in-memory
server or a running one and compares every answer, with server-made
timestamps, revisions and entry codes matched symbolically.

  - L{format}: the file format: version, bodies, writing lines, and
    loading with file:line errors.
  - L{redaction}: synthetic serials, MACs and codes; no passwords or tokens.
  - L{recorder}: recording a server's exchanges to fixture files.
  - L{targets}: where a replay sends its requests (memory or TCP).
  - L{bindings}: server-made values bound from recording to replay.
  - L{compare}: differences between recorded and replayed answers.
  - L{replayer}: playing a fixture and checking every answer.
"""
