"""The web client (issue 19): static files only, served by the embedded broker's WebSocket
listener (imcli/broker/webapp.py). ``static/`` holds the page, its script and style and the
vendored mqtt.js (``static/vendor``, refreshed by ``vendor.sh``); there is no build step.
"""
