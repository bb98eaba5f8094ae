"""The newcomer's demo (scripts/demo.py), in three rooms.

- ``libs.demo.stages``: resumable stages, and what they build that the real workflow gets from elsewhere (the tiny
  encoders and codec, the official-layout export of the pre-trained U-ViT, the shuffled-speaker control cache).
- ``libs.demo.measure``: the instruments (expression classifier, reply-reaction reader) and the numbers the report
  and the test read: learning against controls, the fine-tune's starting point, t2i / i2t before and after.
- ``libs.demo.report``: the self-contained report.html, metrics.json and the closing summary on the terminal.
"""
