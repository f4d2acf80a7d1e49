"""Self-contained HTML reports of a saved run (``xmllm explain --out DIR`` -> ``DIR/report.html``).

A report is rendered from the run folder alone (``explanations.npz``, ``manifest.json`` and
the input images), so cached runs re-render without the model (:func:`.explained.render_report`,
:func:`.explained.write_report`). Every explainer's arrays are drawn by views chosen from their
axes (:mod:`.views`); the page loads nothing from anywhere.
"""
