"""The yardstick for `imcli say`: the least a Python program can do to say one line.

    python benchmarks/paho_say.py PORT USER PASSWORD

Connects with paho, publishes one chat line at QoS 1 to ``im/room/bench/<user>``, waits
for the PUBACK and disconnects. No imcli import, no profile, no validation.
"""

import json
import sys
import time
import uuid

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

port, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3]
client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{user}:paho-{uuid.uuid4().hex[:6]}")
client.username_pw_set(user, password)
client.connect("127.0.0.1", port)
client.loop_start()
payload = json.dumps({"type": "chat", "v": 1, "id": uuid.uuid4().hex, "ts": time.time(), "text": "cold start"})
info = client.publish(f"im/room/bench/{user}", payload, qos=1)
info.wait_for_publish(10)
client.disconnect()
client.loop_stop()
