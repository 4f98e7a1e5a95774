"""Watch and steer registrations live in a local web page (``diffusereg watch``).

- :mod:`diffusereg.watch.session`: :class:`WatchSession` registers one pair in a background
  thread, publishes every sampling step, stops on request and takes new guidance while it runs;
  no web code.
- :mod:`diffusereg.watch.frames`: the pictures of a step (warped image with the deformed grid,
  difference, Jacobian determinant, spread of the samples) as PNG.
- :mod:`diffusereg.watch.server`: the local web server (standard library only) that serves the
  page and streams the session to it as server-sent events.
"""

from diffusereg.watch.server import WatchServer
from diffusereg.watch.session import LiveGuidance, StepState, WatchSession

__all__ = ["LiveGuidance", "StepState", "WatchServer", "WatchSession"]
