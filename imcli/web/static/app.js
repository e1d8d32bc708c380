// imcli's web client: one more MQTT client of the topic contract in docs/PROTOCOL.md.
// Everything other people wrote (messages, names, nicknames, group names, notices) reaches the
// page through textContent inside <bdi> (bidi-isolated), never as HTML: this file parses no HTML at all
// (tests/test_webapp.py checks that it uses none of the DOM's HTML-parsing calls).
"use strict";
(() => {
  const PREFIX = "im";
  const REQUEST_TIMEOUT = 5000; // ms, as the CLI's REQUEST_TIMEOUT
  const HEARTBEAT = 30; // s, DEFAULT_HEARTBEAT
  const MAX_PAYLOAD = 16384;
  const PAGE = 50; // history messages per request
  const NAME = /^[a-z0-9][a-z0-9_-]{0,31}$/;
  const ID = /^[A-Za-z0-9_-]{1,64}$/;
  const CONNACK = {
    2: "this client id is not allowed for the account",
    3: "too many failed logins for this account or from this address, or the server is busy: wait a minute",
    4: "wrong account name or password",
    5: "not authorized (registration closed, a bad invite code, or too many connections)",
  };
  const REGISTER_CONNACK = {
    2: "registration refused",
    3: "too many registrations from this address, or the server is busy: wait a minute",
    4: "that name is invalid, reserved or taken, or the password is not 8 to 1024 characters",
    5: "registration is closed, or it needs a valid invite code",
  };

  const $ = (id) => document.getElementById(id);
  const enc = new TextEncoder();
  const dec = new TextDecoder("utf-8", { fatal: true });

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  // what someone else wrote: text in a bidi isolate, so a U+202E cannot reorder what surrounds it
  const said = (text, cls) => el("bdi", cls, String(text));

  // The one way a URL reaches the page (an <img>'s src, a link's href; tests/test_webapp.py checks
  // that no other code sets one): a blob this page made, or the base64 data: URL of a small PNG or
  // JPEG whose first bytes say so and whose every frame fits (smallImage). Anything else (javascript:,
  // an SVG, a remote address, a data: URL of another type, a thumbnail that lies about its size) is
  // refused: the attribute is removed and the function answers false.
  const DATA_IMAGE = /^data:image\/(png|jpeg);base64,([A-Za-z0-9+/]{4,20000}={0,2})$/;
  function safeUrl(url) {
    if (typeof url !== "string") return null;
    if (url.startsWith(`blob:${location.origin}/`) && /^[0-9a-f-]{36}$/.test(url.slice(location.origin.length + 6))) return url;
    const m = DATA_IMAGE.exec(url);
    if (!m) return null;
    const png = m[2].startsWith("iVBORw0KGgo");
    return (m[1] === "png") === png && smallImage(m[2], png) ? url : null;
  }
  function setUrl(e, attr, url) {
    const ok = safeUrl(url);
    if (ok) e[attr] = ok; else e.removeAttribute(attr);
    return ok !== null;
  }

  function newId() {
    const a = new Uint8Array(16);
    crypto.getRandomValues(a);
    return Array.from(a, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // ------------------------------------------------------------------ topics (imcli/core/topics.py)
  const T = {
    room: (room, from) => `${PREFIX}/room/${room}/${from}`,
    dm: (to, from) => `${PREFIX}/user/${to}/dm/${from}`,
    request: (me, corr) => `${PREFIX}/request/${me}/${corr}`,
    // the status level writes '~' for '.' (§8): NATS refuses a topic with a '.', a Will's too
    status: (me, device) => `${PREFIX}/status/${me}/${device.replaceAll(".", "~")}`,
    group: (group, from) => `${PREFIX}/group/${group}/msg/${from}`,
    parse(topic) {
      if (!topic.startsWith(PREFIX + "/")) return null;
      const l = topic.slice(PREFIX.length + 1).split("/");
      const n = (i) => NAME.test(l[i]);
      if (l[0] === "room" && l.length === 3 && n(1) && n(2)) return { kind: "room", name: l[1], from: l[2] };
      if (l[0] === "user" && l.length === 4 && l[2] === "dm" && n(1) && n(3)) return { kind: "dm", to: l[1], from: l[3] };
      // my own DMs as the broker copies them to my other devices (issue 17): user/<me>/sent/<to>
      if (l[0] === "user" && l.length === 4 && l[2] === "sent" && n(1) && n(3)) return { kind: "dm", to: l[3], from: l[1] };
      if (l[0] === "user" && l.length === 4 && l[2] === "reply" && n(1) && ID.test(l[3])) return { kind: "reply", corr: l[3] };
      if (l[0] === "user" && l.length === 3 && l[2] === "notice" && n(1)) return { kind: "notice" };
      if (l[0] === "user" && l.length === 4 && l[2] === "file" && n(1) && ID.test(l[3])) return { kind: "file_data", stream: l[3] };
      if (l[0] === "user" && l.length === 3 && l[2] === "friends" && n(1)) return { kind: "friends", owner: l[1] };
      if (l[0] === "group" && l.length === 4 && l[2] === "msg" && n(1) && n(3)) return { kind: "group", name: l[1], from: l[3] };
      if (l[0] === "group" && l.length === 3 && l[2] === "info" && n(1)) return { kind: "group_info", name: l[1] };
      if (l[0] === "presence" && l.length === 2 && n(1)) return { kind: "presence", user: l[1] };
      if (l[0] === "profile" && l.length === 2 && n(1)) return { kind: "profile", user: l[1] };
      if (l[0] === "events" && l.length === 1) return { kind: "events" };
      return null;
    },
  };

  // ------------------------------------------------------------------ state
  const S = {
    client: null,
    me: null,
    nick: null,
    device: null,
    convs: new Map(), // "room:lobby" | "dm:bob" | "group:team" -> conversation
    current: null,
    presence: new Map(), // account -> Presence record
    profiles: new Map(), // account -> Profile record (issue 18)
    card: null, // the account whose profile card is shown
    groups: new Map(), // group name -> GroupInfo (the ones this page may read)
    publicGroups: [],
    friends: { friends: [], incoming: [], outgoing: [], dm_policy: "anyone" },
    pending: new Map(), // correlation id -> {resolve, reject, timer}
    canDm: new Map(), // account -> true once the groups worker said so
    uploads: new Map(), // upload id -> handler of its file_progress / file_ready (on reply/<upload>)
    downloads: new Map(), // stream id -> handler of its chunks (on user/<me>/file/<stream>)
    rated: new Map(), // upload id or stream id -> what its transfer does on a rate notice about it
    heartbeat: null,
    started: false,
  };

  const nickOf = (account) => (S.presence.get(account) || {}).nick || account;
  const label = (conv) => (conv.kind === "room" ? conv.name : conv.kind === "dm" ? "@" + conv.name : "#" + conv.name);

  function conversation(kind, name) {
    const key = `${kind}:${name}`;
    let conv = S.convs.get(key);
    if (!conv) {
      conv = { key, kind, name, messages: [], keys: new Set(), unread: 0, mentioned: false, loaded: false, more: false };
      S.convs.set(key, conv);
      renderConvs();
    }
    return conv;
  }

  // ------------------------------------------------------------------ MQTT
  function wsUrl() {
    return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/mqtt`;
  }

  // This browser profile is one device (issue 17): `web-<6 hex>`, kept in localStorage; each tab
  // connects as `<account>:<device>.<4 hex>`; its status level is `<device>~<4 hex>` (§8).
  function browserDevice(fresh) {
    let device = localStorage.getItem("imcli.device");
    if (fresh || !device || !/^web-[0-9a-f]{6}$/.test(device)) {
      device = "web-" + newId().slice(0, 6);
      localStorage.setItem("imcli.device", device);
    }
    return device;
  }

  function tabId() {
    let tab = sessionStorage.getItem("imcli.tab");
    if (!tab || !/^[0-9a-f]{4}$/.test(tab)) {
      tab = newId().slice(0, 4);
      sessionStorage.setItem("imcli.tab", tab);
    }
    return tab;
  }

  // The device credential (dc1:<device>:<secret>) is what this browser keeps; the password never is.
  const CRED = (account) => `imcli.credential.${account}`;
  const storedCredential = (account) => {
    const c = localStorage.getItem(CRED(account));
    return c && /^dc1:[a-z0-9][a-z0-9_-]{0,31}:[A-Za-z0-9_-]{20,100}$/.test(c) ? c : null;
  };
  const forgetCredential = (account) => localStorage.removeItem(CRED(account));

  function publish(topic, payload, opts, done) {
    const data = typeof payload === "string" ? payload : JSON.stringify(payload);
    S.client.publish(topic, data, Object.assign({ qos: 1 }, opts || {}), done);
  }

  function request(payload) {
    return new Promise((resolve, reject) => {
      const corr = newId();
      const timer = setTimeout(() => {
        S.pending.delete(corr);
        reject(new Error("no worker answered within 5s (is imcli serve running its workers?)"));
      }, REQUEST_TIMEOUT);
      S.pending.set(corr, { resolve, reject, timer });
      publish(T.request(S.me, corr), Object.assign({ v: 1, id: newId() }, payload));
    });
  }

  function register(account, password, invite) {
    return new Promise((resolve, reject) => {
      const username = invite ? `register:${account}:${invite}` : `register:${account}`;
      const c = mqtt.connect(wsUrl(), {
        protocolVersion: 4, clientId: `register:${account}`, username, password, clean: true,
        reconnectPeriod: 0, connectTimeout: 10000,
      });
      c.on("connect", () => { c.end(true); resolve(); });
      c.on("error", (err) => { c.end(true); reject(new Error(REGISTER_CONNACK[err.code] || err.message)); });
      c.on("close", () => reject(new Error("the server closed the connection")));
    });
  }

  // Connect and stay connected (mqtt.js reconnects); resolves once subscribed the first time.
  // `secret` is the device credential, or the password when this broker issues none.
  function connect(account, secret) {
    return new Promise((resolve, reject) => {
      S.me = account;
      S.secret = secret;
      const credDevice = secret.startsWith("dc1:") ? secret.split(":")[1] : null;
      S.device = `${credDevice || browserDevice(false)}.${tabId()}`;
      const statusTopic = T.status(account, S.device);
      const client = mqtt.connect(wsUrl(), {
        protocolVersion: 4, clientId: `${account}:${S.device}`, username: account, password: secret, clean: true,
        keepalive: 30, reconnectPeriod: 3000, connectTimeout: 10000, resubscribe: false,
        will: { topic: statusTopic, payload: "", qos: 1, retain: true },
      });
      S.client = client;
      let first = true;
      client.on("connect", () => {
        setConn("connected");
        online(statusTopic).then(() => {
          if (first) { first = false; resolve(); }
        });
      });
      client.on("error", (err) => {
        const code = err.code;
        let text = CONNACK[code] || err.message;
        if (code === 4 && credDevice) {
          forgetCredential(account); // revoked, or the account is gone: sign in again with the password
          text = "this browser was signed out (its device was revoked): sign in again";
        }
        if (first) { first = false; client.end(true); reject(new Error(text)); return; }
        setStatus(text, true);
        if (code === 2 || code === 4 || code === 5) { client.end(true); signedOut(text); }
      });
      client.on("reconnect", () => setConn("reconnecting…"));
      client.on("offline", () => setConn("offline"));
      client.on("message", (topic, payload, packet) => onMessage(topic, payload, packet));
    });
  }

  function disconnect() {
    if (!S.client) return Promise.resolve();
    const client = S.client;
    clearInterval(S.heartbeat);
    for (const w of S.pending.values()) { clearTimeout(w.timer); w.reject(new Error("signed out")); }
    S.pending.clear();
    return new Promise((resolve) => {
      // clear this device's status, then a clean DISCONNECT (so the Will does not fire)
      client.publish(T.status(S.me, S.device), "", { qos: 1, retain: true }, () => client.end(false, {}, resolve));
    });
  }

  // Password sign-in, then trade the password once for this browser's device credential (issue 17)
  // in the background: from then on the connection's reconnects, and the next visit, use the
  // credential, and the password is gone from the page. A broker without device credentials
  // (Mosquitto: `unsupported`, or no answer) keeps the password, in this page's memory only.
  async function signIn(account, password) {
    const stored = password ? null : storedCredential(account);
    if (stored) return connect(account, stored);
    if (!password) throw new Error("give the password (this browser has no sign-in of its own for this account)");
    await connect(account, password);
    adoptDevice(account);
  }

  async function adoptDevice(account) {
    const device = S.device.split(".")[0];
    let reply = null;
    try {
      reply = await request({ type: "device_request", op: "issue", name: device, revoke_others: false });
    } catch (e) {
      S.deviceNote = e.message;
      if (/taken/i.test(e.message)) browserDevice(true); // another browser of this account has the name: a new one next time
      return;
    }
    if (!reply.credential || reply.credential.split(":")[1] !== device) return;
    localStorage.setItem(CRED(account), reply.credential);
    localStorage.setItem("imcli.last", account);
    S.secret = reply.credential;
    S.client.options.password = reply.credential; // mqtt.js reconnects with its options: no password kept
    S.deviceCredential = true;
    $("me-device").textContent = `this browser is device ${device}`;
  }

  // What the page reads of user/<me>/: not `#`, which also brought it the chunks of every download
  // the same user's terminal or other pages make (100 MiB to each open page for a 100 MiB file); a
  // download's own topic is subscribed while it runs (fetchFile), and again after a reconnect.
  const fileTopic = (stream) => `${PREFIX}/user/${S.me}/file/${stream}`;

  function online(statusTopic) {
    const subs = {};
    const mine = ["dm/+", "sent/+", "reply/+", "notice", "friends"].map((x) => `${PREFIX}/user/${S.me}/${x}`);
    for (const f of [...mine, ...[...S.downloads.keys()].map(fileTopic), `${PREFIX}/room/+/+`, `${PREFIX}/group/+/msg/+`,
      `${PREFIX}/group/+/info`, `${PREFIX}/presence/+`, `${PREFIX}/profile/+`, `${PREFIX}/events`]) subs[f] = { qos: 1 };
    return new Promise((resolve) => {
      S.client.subscribe(subs, () => {
        const status = () => publish(statusTopic, { type: "status", v: 1, state: "online", interval: HEARTBEAT, ts: Date.now() / 1000 }, { retain: true });
        status();
        clearInterval(S.heartbeat);
        S.heartbeat = setInterval(status, HEARTBEAT * 1000);
        refreshGroups();
        resolve();
      });
    });
  }

  // Sign out: revoke this browser's device (its credential stops working), forget it, disconnect.
  async function signOut() {
    if (S.secret && S.secret.startsWith("dc1:")) {
      try {
        await request({ type: "device_request", op: "revoke", name: S.secret.split(":")[1], revoke_others: false });
      } catch (e) { /* the broker ends the device's connections; nothing else to do */ }
      forgetCredential(S.me);
    }
    await disconnect();
  }

  // ------------------------------------------------------------------ incoming
  // A worker's record, checked against its model's shape (imcli/core/wire.py) before any renderer sees
  // it, as the CLI's pydantic models check it: a record with a field of another type (a nick that is a
  // number, a friends list that is null: a worker with a bug, another broker's path) is dropped whole,
  // so no renderer ever meets a value it would throw on. A record about <user> must name that <user>.
  const isStr = (x) => typeof x === "string";
  const optStr = (x) => x === undefined || x === null || isStr(x);
  const isName = (x) => isStr(x) && NAME.test(x);
  const names = (x) => Array.isArray(x) && x.length <= 100000 && x.every(isName);
  const optNames = (x) => x === undefined || names(x);
  const SHAPES = {
    presence: { account: isName, nick: isStr, state: (x) => x === "online" || x === "offline" },
    event: { account: isName, nick: isStr, event: isStr, old_nick: optStr, device: optStr },
    notice: { code: isStr, text: isStr, topic: optStr, retry: (x) => x === undefined || x === null || typeof x === "number", requests: (x) => x === undefined || x === null || (Array.isArray(x) && x.every(isStr)) },
    profile: { account: isName, name: isStr, signature: optStr, about: optStr, avatar: (x) => x === undefined || x === null || (typeof x === "object" && optStr(x.thumbnail)) },
    friends: { account: isName, friends: optNames, incoming: optNames, outgoing: optNames },
    group: { name: isName, members: names, private: (x) => x === undefined || typeof x === "boolean" },
    moment: {
      id: isStr, author: isName, text: optStr, likes: optNames,
      comments: (x) => x === undefined || (Array.isArray(x) && x.every((c) => c && isName(c.author) && isStr(c.text))),
      images: (x) => x === undefined || (Array.isArray(x) && x.every((i) => i && typeof i === "object")),
    },
  };
  const records = (list, type) => (Array.isArray(list) ? list.filter((x) => record(x, type)) : []);
  function record(obj, type) {
    if (!obj || typeof obj !== "object" || Array.isArray(obj) || obj.type !== type) return null;
    return Object.entries(SHAPES[type]).every(([key, ok]) => ok(obj[key])) ? obj : null;
  }

  function onMessage(topic, payload, packet) {
    const t = T.parse(topic);
    if (!t) return;
    if (t.kind === "room" || t.kind === "dm" || t.kind === "group") return onChat(t, payload);
    if (t.kind === "file_data") {
      const take = S.downloads.get(t.stream);
      if (take) take(payload);
      return;
    }
    let obj = null;
    try {
      obj = payload.length ? JSON.parse(dec.decode(payload)) : null;
    } catch (e) {
      return; // not one of our models: ignored, as the CLI ignores malformed records
    }
    if (t.kind === "reply") return onReply(t.corr, obj);
    if (t.kind === "presence" && record(obj, "presence") && obj.account === t.user) {
      S.presence.set(t.user, obj);
      if (t.user === S.me) { S.nick = obj.nick; renderMe(); }
      renderPeople(); renderConvs();
      return;
    }
    if (t.kind === "profile") return onProfile(t.user, record(obj, "profile"), packet && packet.retain);
    if (t.kind === "events" && record(obj, "event")) return onEvent(obj);
    if (t.kind === "notice" && record(obj, "notice")) return onNotice(obj);
    if (t.kind === "friends" && t.owner === S.me && record(obj, "friends") && obj.account === S.me) {
      S.friends = { friends: [], incoming: [], outgoing: [], ...obj };
      return renderFriends();
    }
    if (t.kind === "group_info") {
      if (record(obj, "group") && obj.name === t.name) S.groups.set(t.name, obj); else S.groups.delete(t.name);
      renderGroups();
      if (S.current && S.current.kind === "group" && S.current.name === t.name) renderHeader();
    }
  }

  function onReply(corr, obj) {
    const upload = S.uploads.get(corr);
    if (upload && obj) return upload(obj);
    const waiting = S.pending.get(corr);
    if (!waiting || !obj) return;
    S.pending.delete(corr);
    clearTimeout(waiting.timer);
    if (obj.type === "error") waiting.reject(new Error(obj.text || obj.code)); else waiting.resolve(obj);
  }

  // Every string of a parsed JSON value, its members' names too, without a lone surrogate: JSON.parse
  // takes "\ud800", the Python side's parser refuses it, so the CLI shows such a line as malformed and
  // the archive keeps none; the page says the same instead of showing a line that history then lacks.
  function wellFormed(x, depth = 0) {
    if (typeof x === "string") return x.isWellFormed();
    if (!x || typeof x !== "object") return true;
    if (depth > 64) return false; // deeper than any of our models: not one of them
    return Object.entries(x).every(([k, v]) => k.isWellFormed() && wellFormed(v, depth + 1));
  }

  function decodeChat(payload) {
    // imcli/core/wire.py decode_chat: a JSON object with "type" must be a chat; other UTF-8 is plain text.
    // null: malformed (not UTF-8, an invalid chat, empty), shown as such, as the CLI does.
    let text;
    try {
      text = dec.decode(payload);
    } catch (e) {
      return null;
    }
    if (text.trimStart().startsWith("{")) {
      let obj = null;
      try { obj = JSON.parse(text); } catch (e) { obj = null; }
      if (obj && typeof obj === "object" && "type" in obj) {
        if (obj.type !== "chat" || obj.v !== 1 || typeof obj.text !== "string" || !obj.text || !ID.test(obj.id || "")) return null;
        if (!wellFormed(obj)) return null;
        return { id: obj.id, ts: typeof obj.ts === "number" ? obj.ts : Date.now() / 1000, text: obj.text, file: fileInfo(obj.file) };
      }
    }
    if (!text.trim()) return null;
    return { id: newId(), ts: Date.now() / 1000, text };
  }

  function onChat(t, payload) {
    const msg = decodeChat(payload);
    let conv;
    if (t.kind === "room") conv = conversation("room", t.name);
    else if (t.kind === "group") conv = conversation("group", t.name);
    else conv = conversation("dm", t.from === S.me ? t.to : t.from);
    // a malformed line is said, not dropped (the CLI's "(malformed message on …)"), in the open conversation
    if (!msg) return system(conv, `(a malformed message from @${t.from})`, true);
    msg.from = t.from;
    addMessage(conv, msg, true);
  }

  function onProfile(user, obj, retained) {
    if (!obj || obj.type !== "profile" || obj.account !== user) {
      S.profiles.delete(user);
    } else {
      const before = S.profiles.get(user);
      S.profiles.set(user, obj);
      // a live change (not the retained copy a subscription starts with) is an event, as in listen
      const was = before || { signature: "", about: "", avatar: null };
      const changed = obj.signature !== was.signature || obj.about !== was.about || JSON.stringify(obj.avatar) !== JSON.stringify(was.avatar);
      if (!retained && changed && user !== S.me && S.current && S.current.kind === "room") { // a rename has its own event
        const what = obj.signature !== was.signature ? `: signature “${obj.signature}”` : "";
        system(S.current, `${obj.name}${obj.name !== user ? ` (@${user})` : ""} changed their profile${what}`);
      }
    }
    if (user === S.me) fillMyProfile();
    renderPeople();
    if (S.card === user) renderCard();
  }

  function onEvent(ev) {
    const who = ev.account;
    let text;
    if (ev.event === "rename") text = `${ev.old_nick || who} is now ${ev.nick}`;
    else {
      const verb = { join: "is online", leave: "went offline",
        device_join: `is online on ${ev.device} too`, device_leave: `left ${ev.device}` }[ev.event] || ev.event;
      text = `${ev.nick}${ev.nick !== who ? ` (${who})` : ""} ${verb}`;
    }
    const rec = S.presence.get(who) || { account: who, nick: ev.nick, state: "offline", devices: 0 };
    rec.nick = ev.nick;
    if (ev.event === "join") rec.state = "online";
    if (ev.event === "leave") rec.state = "offline";
    S.presence.set(who, rec);
    if (who === S.me) { S.nick = ev.nick; renderMe(); }
    renderPeople();
    const lobby = S.current && S.current.kind === "room" ? S.current : null;
    if (lobby) system(lobby, text);
  }

  // A rate notice names the requests the embedded broker dropped (its topic, or the ids of an
  // aggregated one): no worker will answer them, so they fail at once (imcli/core/request_reply.py)
  // (a transfer's chunk or acknowledgement, on upload/<me>/<upload> or fetch/<me>/<stream>: it pauses)
  function failDropped(n) {
    const mine = `${PREFIX}/request/${S.me}/`;
    const corrs = Array.isArray(n.requests) ? n.requests.slice(0, 400) : [];
    if (typeof n.topic === "string" && n.topic.startsWith(mine)) corrs.push(n.topic.slice(mine.length));
    for (const kind of ["upload", "fetch"]) {
      const of = `${PREFIX}/${kind}/${S.me}/`;
      const pause = typeof n.topic === "string" && n.topic.startsWith(of) ? S.rated.get(n.topic.slice(of.length)) : null;
      if (pause) pause(n);
    }
    const wait = retryIn(n);
    for (const corr of corrs) {
      const waiting = typeof corr === "string" ? S.pending.get(corr) : undefined;
      if (!waiting) continue;
      S.pending.delete(corr);
      clearTimeout(waiting.timer);
      waiting.reject(new Error(`the broker dropped the request: messages sent too fast (try again ${wait})`));
    }
  }

  function retryIn(n) {
    const ok = typeof n.retry === "number" && n.retry >= 0 && n.retry <= 86400;
    return ok ? `in ${Math.max(1, Math.ceil(n.retry))}s` : "in a few seconds";
  }

  function onNotice(n) {
    if (n.code === "rate") failDropped(n);
    if (n.code === "device_revoked" && S.secret && n.topic === S.secret.split(":")[1]) {
      forgetCredential(S.me);
      if (S.client) S.client.end(true);
      return signedOut("this browser was signed out (its device was revoked): sign in again");
    }
    const bad = n.code === "denied" || n.code === "too_large" || n.code === "rate" || n.code === "limit";
    if (S.current) system(S.current, n.text, bad);
    if (n.code === "group") refreshGroups();
    if (n.code === "moments" && S.momentsOpen) loadFeed(false);
    setStatus(n.text, bad);
  }

  // ------------------------------------------------------------------ conversations
  function mentions(text) {
    const names = [S.me, S.nick].filter(Boolean).map((n) => n.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"));
    return new RegExp(`(^|[^A-Za-z0-9_.-])@?(${names.join("|")})(?![A-Za-z0-9_-])`, "i").test(text);
  }

  function addMessage(conv, msg, live) {
    const key = `${msg.from}/${msg.id}`;
    if (conv.keys.has(key)) return;
    conv.keys.add(key);
    msg.mention = msg.from !== S.me && mentions(msg.text);
    const at = conv.messages.findIndex((m) => m.ts > msg.ts);
    const appended = at === -1;
    if (appended) conv.messages.push(msg); else conv.messages.splice(at, 0, msg);
    const visible = conv === S.current && document.visibilityState === "visible";
    if (live && msg.from !== S.me && !visible) {
      conv.unread += 1;
      if (msg.mention) conv.mentioned = true;
      renderConvs();
    }
    if (live && msg.mention && (conv !== S.current || document.visibilityState !== "visible")) notify(conv, msg);
    if (conv === S.current) {
      if (appended) { $("messages").append(messageItem(msg)); scrollDown(); } else renderMessages();
    }
  }

  function notify(conv, msg) {
    if (!("Notification" in window) || Notification.permission !== "granted") return;
    // 200 characters, never half of one: String.slice counts UTF-16 units, and cut an emoji in two
    const body = Array.from(msg.text.slice(0, 400)).slice(0, 200).join("");
    const n = new Notification(`${nickOf(msg.from)} in ${label(conv)}`, { body, tag: conv.key });
    n.onclick = () => { window.focus(); open(conv); };
  }

  // A line of the page's own (an event, a notice, a malformed message) is kept with the conversation's
  // messages, not only in the list on screen: a history reply or a message that sorts earlier redraws
  // the list, and a line kept in the DOM alone was wiped by it (a malformed line said while the
  // history request was out was silently gone)
  function system(conv, text, bad) {
    if (!conv) return;
    const line = { system: true, bad: !!bad, text, ts: Date.now() / 1000 };
    conv.messages.push(line);
    if (conv === S.current) { $("messages").append(messageItem(line)); scrollDown(); }
  }

  function open(conv) {
    if (S.momentsOpen) showMoments(false);
    S.current = conv;
    conv.unread = 0;
    conv.mentioned = false;
    document.body.classList.remove("show-menu");
    renderConvs();
    renderHeader();
    renderMessages();
    if (!conv.loaded) loadHistory(conv, false);
    $("text").focus();
  }

  async function loadHistory(conv, older) {
    if (conv.loading) return;
    conv.loading = true;
    $("older").disabled = true;
    const ask = { type: "history", limit: PAGE };
    ask[conv.kind === "dm" ? "user" : conv.kind] = conv.name;
    // the next older page: before the oldest the archive sent, by its own clock (``at``). A line's ``ts``
    // is its sender's word: a raw client's "ts": 0 made every older page come back empty
    if (older && conv.oldest !== undefined) ask.before = conv.oldest;
    try {
      const reply = await request(ask);
      conv.loaded = true;
      conv.more = !!reply.more;
      const top = $("log").scrollHeight - $("log").scrollTop;
      for (const r of Array.isArray(reply.messages) ? reply.messages : []) if (isName(r.from) && isStr(r.text) && isStr(r.id)) addMessage(conv, { from: r.from, id: r.id, ts: r.ts, text: r.text, file: fileInfo(r.file) }, false);
      const ats = (Array.isArray(reply.messages) ? reply.messages : []).map((r) => r.at).filter(Number.isFinite);
      if (ats.length) conv.oldest = Math.min(conv.oldest ?? Infinity, ...ats);
      if (conv === S.current) {
        renderMessages();
        if (older) $("log").scrollTop = $("log").scrollHeight - top; else scrollDown();
      }
    } catch (e) {
      if (conv === S.current) system(conv, `history: ${e.message}`, true);
    } finally {
      conv.loading = false;
      $("older").disabled = false;
    }
  }

  async function send(text) {
    const conv = S.current;
    text = text.replace(/\n$/, "");
    if (!conv || !text.trim()) return;
    const msg = { type: "chat", v: 1, id: newId(), ts: Date.now() / 1000, text };
    const data = JSON.stringify(msg);
    if (enc.encode(data).length > MAX_PAYLOAD) return setStatus(`message too long: the limit is ${MAX_PAYLOAD} bytes`, true);
    let topic;
    if (conv.kind === "room") topic = T.room(conv.name, S.me);
    else if (conv.kind === "group") {
      const g = S.groups.get(conv.name);
      if (!g || !g.members.includes(S.me)) return setStatus(`you are not a member of #${conv.name} (join it first)`, true);
      topic = T.group(conv.name, S.me);
    } else {
      if (!S.canDm.get(conv.name)) {
        try {
          const r = await request({ type: "friend_request", op: "can_dm", user: conv.name });
          if (!r.allowed) return setStatus(`${conv.name} accepts direct messages from friends only (ask first: add them as a friend)`, true);
          S.canDm.set(conv.name, true);
        } catch (e) {
          return setStatus(e.message, true);
        }
      }
      topic = T.dm(conv.name, S.me);
    }
    // "sending…" until the broker has it (its PUBACK; mqtt.js keeps it while the connection is down and
    // sends it again on the next): the line was shown as sent at once, even with the broker unreachable
    const mine = { from: S.me, id: msg.id, ts: msg.ts, text, pending: true };
    addMessage(conv, mine, true);
    publish(topic, data, undefined, (err) => {
      mine.pending = false;
      mine.failed = !!err;
      if (conv === S.current) {
        const li = [...$("messages").children].find((el) => el.dataset.id === mine.id && el.dataset.from === S.me);
        if (li) li.replaceWith(messageItem(mine));
      }
      if (err) setStatus(`not sent: ${err.message}`, true);
    });
  }

  // ------------------------------------------------------------------ groups and friends
  async function refreshGroups() {
    try {
      // every page (docs/PROTOCOL.md: a page says "more" when the count or the broker's payload limit
      // cut it): the next one starts after the last name of this one; one that brings nothing new stops
      const publicGroups = [];
      let after = null;
      for (;;) {
        const ask = { type: "group_request", op: "list", group: "", private: false };
        if (after !== null) ask.after = after;
        const r = await request(ask);
        const mine = records(r.mine, "group"), others = records(r.public, "group");
        for (const g of mine) S.groups.set(g.name, g);
        publicGroups.push(...others.map((g) => g.name));
        const names = [...mine, ...others].map((g) => g.name).sort();
        const last = names.length ? names[names.length - 1] : null;
        if (r.more !== true) break;
        if (last === null || (after !== null && last <= after)) throw new Error("the list stopped in the middle");
        after = last;
      }
      S.publicGroups = publicGroups;
      renderGroups();
    } catch (e) {
      setStatus(`groups: ${e.message}`, true);
    }
  }

  async function groupOp(op, group, user, priv) {
    const ask = { type: "group_request", op, group, private: !!priv };
    if (user) ask.user = user;
    try {
      const r = await request(ask);
      if (record(r.group, "group")) S.groups.set(r.group.name, r.group); else S.groups.delete(group);
      renderGroups();
      setStatus(`${op}: done`);
      return r;
    } catch (e) {
      setStatus(`${op} #${group}: ${e.message}`, true);
      return null;
    }
  }

  async function friendOp(op, user) {
    try {
      const r = await request({ type: "friend_request", op, user });
      if (record(r.record, "friends")) S.friends = { friends: [], incoming: [], outgoing: [], ...r.record };
      renderFriends();
      setStatus(`friend ${op}: done`);
    } catch (e) {
      setStatus(`friend ${op}: ${e.message}`, true);
    }
  }

  // ------------------------------------------------------------------ profiles (issue 18)
  function thumbnailUrl(b64) {
    // a profile's thumbnail: base64 of a small PNG or JPEG, recognised by its first bytes
    if (typeof b64 !== "string" || b64.length > 20000 || !/^[A-Za-z0-9+/]+=*$/.test(b64)) return null;
    // no bitmap of hundreds of megabytes from 12 KiB of base64: safeUrl checks its size
    return safeUrl(`data:image/${b64.startsWith("iVBORw0KGgo") ? "png" : "jpeg"};base64,${b64}`);
  }

  function renderCard() {
    const who = S.card;
    $("profile-card").hidden = !who;
    if (!who) return;
    const prof = S.profiles.get(who) || {};
    const pres = S.presence.get(who);
    $("card-name").textContent = prof.name || nickOf(who);
    $("card-account").textContent = who;
    $("card-presence").textContent = pres ? (pres.state === "online" ? "online" : "offline") : "";
    $("card-signature").replaceChildren(said(prof.signature || ""));
    $("card-about").replaceChildren(said(prof.about || ""));
    const url = prof.avatar ? thumbnailUrl(prof.avatar.thumbnail) : null;
    $("card-avatar").hidden = !url;
    setUrl($("card-avatar"), "src", url);
    $("card-dm").hidden = who === S.me;
  }

  function fillMyProfile() {
    const mine = S.profiles.get(S.me);
    if (!mine || $("my-profile").open) return; // never overwrite what is being typed
    $("signature-input").value = mine.signature || "";
    $("about-input").value = mine.about || "";
  }


  // ------------------------------------------------------------------ moments (§15)
  // A feed the moments worker answers to one reader at a time: nothing retained, nothing to
  // subscribe to but the `moments` notices, which refresh the feed when it is open.
  function showMoments(show) {
    S.momentsOpen = show;
    $("moments").hidden = !show;
    $("log").hidden = show;
    $("composer").hidden = show;
    $("moments-open").classList.toggle("current", show);
    if (show) {
      S.current = null;
      document.body.classList.remove("show-menu");
      $("conv-title").replaceChildren(said("Moments"));
      $("group-bar").hidden = true;
      renderConvs();
      loadFeed(false);
    }
  }

  async function momentOp(ask) {
    try {
      return await request(Object.assign({ type: "moment_request", limit: 20, images: [] }, ask));
    } catch (e) {
      setStatus(`moments: ${e.message}`, true);
      return null;
    }
  }

  async function loadFeed(older) {
    const ask = { op: "feed", limit: 20 };
    if (older && S.feed && S.feed.length) ask.before = S.feed[S.feed.length - 1].ts;
    const r = await momentOp(ask);
    if (!r) return;
    S.feed = older ? (S.feed || []).concat(records(r.moments, "moment")) : records(r.moments, "moment");
    $("feed-older").hidden = !r.more;
    renderFeed();
  }

  function replaceMoment(m) {
    S.feed = (S.feed || []).map((x) => (x.id === m.id ? m : x));
    renderFeed();
  }

  function momentItem(m) {
    const li = el("li", "moment");
    li.dataset.id = m.id;
    li.dataset.author = m.author;
    li.append(said(nickOf(m.author), "from"), el("span", "time", ` ${clock(m.ts)}`));
    if (m.text) li.append(said(m.text, "text"));
    for (const image of m.images || []) {
      const url = thumbnailUrl(image.thumbnail);
      const img = el("img", "thumb");
      img.alt = "";
      if (setUrl(img, "src", url)) li.append(img);
    }
    const likes = m.likes || [];
    if (likes.length) li.append(el("div", "likes", `♥ ${likes.map(nickOf).join(", ")}`));
    for (const c of m.comments || []) {
      const row = el("div", "comment");
      row.append(said(nickOf(c.author), "who"), said(c.text, "text"));
      li.append(row);
    }
    const mine = likes.includes(S.me);
    const like = el("button", "secondary small like", mine ? "Unlike" : "Like");
    like.addEventListener("click", async () => {
      const r = await momentOp({ op: mine ? "unlike" : "like", post: m.id });
      if (r && record((r.moments || [])[0], "moment")) replaceMoment(r.moments[0]);
    });
    const form = el("form", "inline");
    const input = el("input");
    input.placeholder = "comment";
    input.maxLength = 500;
    form.append(input, el("button", "small", "Comment"));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const text = input.value.trim();
      if (!text) return;
      const r = await momentOp({ op: "comment", post: m.id, text });
      if (r && record((r.moments || [])[0], "moment")) replaceMoment(r.moments[0]);
    });
    li.append(like, form);
    if (m.author === S.me) {
      const del = el("button", "secondary small", "Delete");
      del.addEventListener("click", async () => {
        const r = await momentOp({ op: "delete", post: m.id });
        if (!r) return;
        S.feed = S.feed.filter((x) => x.id !== m.id);
        renderFeed();
        // then its images, as `imcli moments delete`: the reply names those no other moment of mine shows
        const gone = r.moments && r.moments[0] ? r.moments[0].images || [] : [];
        let removed = 0;
        for (const file of new Set(gone.map((i) => i.file))) {
          try {
            await request({ type: "file_delete", file });
            removed++;
          } catch (e) {
            if (!/^no file /.test(e.message)) return setStatus(`the moment is deleted, not its images: ${e.message}`, true);
          }
        }
        setStatus(removed ? `moment deleted, and its ${removed} image${removed === 1 ? "" : "s"}` : "moment deleted");
      });
      li.append(del);
    }
    return li;
  }

  function renderFeed() {
    $("feed").replaceChildren(...(S.feed || []).map(momentItem));
  }


  // ------------------------------------------------------------------ files (issue 16)
  // The bytes travel in chunks (8-byte big-endian offset, then data) beside request/reply:
  // uploads on upload/<me>/<upload> paced by the worker's file_progress, downloads on
  // user/<me>/file/<stream> paced by our file_ack. Shown: the name as text, the worker's JPEG
  // thumbnail as a data: image, the full image only as a blob of an image type we name.
  const IMAGE_TYPES = ["image/png", "image/jpeg", "image/gif", "image/webp"];
  const FILE_ID = /^[A-Za-z0-9_-]{16,64}$/;
  const CHUNK_HEADER = 8;
  // a chunk's bytes at most, whatever the worker's file_upload says: the embedded broker's WebSocket
  // listener takes messages of up to 1 MiB (websockets' max_size), a chunk is one MQTT packet in one
  const LARGEST_CHUNK = 1000 << 10;
  const ACK_EVERY = 256 << 10;
  const STALL = 15000;
  // a transfer whose chunk or acknowledgement the file-transfer rate dropped (its rate notice) waits as
  // the notice says, at least a second (one notice a second), and goes on: this many times at most, and
  // for waits this short; else it fails at once (as imcli/client/files.py)
  const RATE_PAUSES = 30;
  const RATE_PAUSE_MAX = 5;
  const AGAIN = {}; // sendChunks' answer after such a wait: offer again, from the worker's copy

  // Milliseconds to wait for the pauses-th rate notice n of a transfer, or an Error naming the rate.
  function ratePause(n, pauses) {
    const retry = typeof n.retry === "number" && n.retry >= 0 && n.retry <= 86400 ? n.retry : 1;
    if (pauses < RATE_PAUSES && retry <= RATE_PAUSE_MAX) return Math.max(retry, 1) * 1000;
    return new Error(`the broker dropped part of the file transfer: account ${S.me} hit its file transfer rate (try again ${retryIn(n)}: send it again, it goes on where it stopped)`);
  }

  // A thumbnail as the files worker makes them: a JPEG (an avatar's: or a PNG) of at most 160 pixels a
  // side (THUMB_SIDE in imcli/files/images.py; 320 allowed, as imcli.core.thumbnail). File messages,
  // profiles and moments are anyone's payload, and 9,000 characters of base64 hold a PNG of 7000 x 7000
  // pixels, which the page would decode to 196 MB.
  function smallImage(b64, png = false) {
    let b;
    try { b = atob(b64); } catch { return false; }
    const at = (i) => (b.charCodeAt(i) << 8) | b.charCodeAt(i + 1);
    const fits = (w, h) => w > 0 && h > 0 && w <= 320 && h <= 320;
    if (png && b.startsWith("\x89PNG\r\n\x1a\n") && b.slice(12, 16) === "IHDR" && b.length >= 24) {
      return at(16) === 0 && at(20) === 0 && fits(at(18), at(22));
    }
    if (b.charCodeAt(0) !== 0xff || b.charCodeAt(1) !== 0xd8) return false;
    // every frame header up to the scan's start must fit (a JPEG may carry more than one; a decoder
    // may use any), and there must be one
    let frames = 0;
    for (let i = 2; i + 3 < b.length; ) {
      if (b.charCodeAt(i) !== 0xff) return false;
      const marker = b.charCodeAt(i + 1);
      if (marker === 0xff) { i += 1; continue; } // fill byte
      if (marker === 0xd9 || marker === 0xda) break; // the end, or the scan
      if (marker >= 0xc0 && marker <= 0xcf && marker !== 0xc4 && marker !== 0xc8 && marker !== 0xcc) {
        if (i + 9 > b.length || !fits(at(i + 7), at(i + 5))) return false;
        frames += 1;
      }
      i += 2 + at(i + 2);
    }
    return frames > 0;
  }

  function fileInfo(f) {
    // a file message as the sender put it: only its well-formed fields are used
    if (!f || typeof f !== "object" || !FILE_ID.test(f.id || "") || typeof f.name !== "string" || !f.name) return null;
    if (!Number.isInteger(f.size) || f.size < 1 || !/^[0-9a-f]{64}$/.test(f.sha256 || "")) return null;
    const thumb = typeof f.thumb === "string" && f.thumb.length <= 9000 && /^[A-Za-z0-9+/]+=*$/.test(f.thumb) && smallImage(f.thumb) ? f.thumb : null;
    const mime = typeof f.mime === "string" ? f.mime : "application/octet-stream";
    return { type: "file", v: 1, id: f.id, name: f.name, size: f.size, mime, sha256: f.sha256, width: f.width, height: f.height, thumb };
  }

  function humanSize(n) {
    if (n < 1024) return `${n} byte${n === 1 ? "" : "s"}`;
    let v = n;
    for (const unit of ["KiB", "MiB", "GiB", "TiB"]) {
      v /= 1024;
      if (v < 1024 || unit === "TiB") return `${v.toFixed(1)} ${unit}`.replace(".0 ", " ");
    }
    return `${n} bytes`;
  }

  function describe(f) {
    const extra = f.width && f.height ? `, ${f.width}x${f.height}` : "";
    return `sent a file: ${f.name} (${humanSize(f.size)}, ${f.mime}${extra}) - imcli get ${f.id}`;
  }

  async function sha256hex(bytes) {
    if (!crypto.subtle) throw new Error("files need a secure page: https, or http on 127.0.0.1");
    const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
    return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function chunkOf(offset, bytes) {
    const out = new Uint8Array(CHUNK_HEADER + bytes.length);
    new DataView(out.buffer).setBigUint64(0, BigInt(offset));
    out.set(bytes, CHUNK_HEADER);
    return out;
  }

  function showUpload(name, fraction) {
    $("upload").hidden = fraction === null;
    $("upload-name").textContent = name;
    $("upload-progress").value = fraction || 0;
  }

  async function fileTarget(conv) {
    if (conv.kind === "room") return { room: conv.name };
    if (conv.kind === "group") {
      const g = S.groups.get(conv.name);
      if (!g || !g.members.includes(S.me)) throw new Error(`you are not a member of #${conv.name} (join it first)`);
      return { group: conv.name };
    }
    if (!S.canDm.get(conv.name)) {
      const r = await request({ type: "friend_request", op: "can_dm", user: conv.name });
      if (!r.allowed) throw new Error(`${conv.name} accepts direct messages from friends only`);
      S.canDm.set(conv.name, true);
    }
    return { user: conv.name };
  }

  function sendChunks(bytes, start, name, pauses) {
    return new Promise((resolve, reject) => {
      const topic = `${PREFIX}/upload/${S.me}/${start.upload}`;
      // the worker's chunk is the broker's limit on upload topics (256 KiB on imcli serve, 16 KiB for
      // everything else), as `imcli send` uses it: 16 times fewer publishes than MAX_PAYLOAD's
      const step = Math.max(1, Math.min(start.chunk, LARGEST_CHUNK));
      let sent = start.offset;
      let acked = start.offset;
      let stall = null;
      let paused = false;
      const finish = (file, err) => {
        clearTimeout(stall);
        S.uploads.delete(start.upload);
        S.rated.delete(start.upload);
        if (err) reject(err); else resolve(file);
      };
      const pump = () => {
        if (paused) return;
        while (sent < bytes.length && sent - acked < start.window) {
          const end = Math.min(sent + step, bytes.length);
          S.client.publish(topic, chunkOf(sent, bytes.subarray(sent, end)), { qos: 1 });
          sent = end;
        }
        clearTimeout(stall);
        stall = setTimeout(() => finish(null), STALL); // the worker went quiet: offer again
      };
      S.uploads.set(start.upload, (obj) => {
        if (obj.type === "file_progress" && Number.isInteger(obj.offset)) {
          if (obj.offset < acked) return finish(null); // the worker lost chunks: offer again
          acked = obj.offset;
          showUpload(name, acked / bytes.length);
          pump();
        } else if (obj.type === "file_ready") finish(obj.file);
        else if (obj.type === "error") finish(null, new Error(obj.text || obj.code));
      });
      S.rated.set(start.upload, (n) => {
        if (paused) return;
        const ms = ratePause(n, pauses.n++);
        if (ms instanceof Error) return finish(null, ms);
        paused = true;
        clearTimeout(stall);
        stall = setTimeout(() => finish(AGAIN), ms);
      });
      pump();
    });
  }

  // Store a file with the files worker for a conversation (resuming an earlier attempt): its FileInfo.
  async function storeFile(file, name, target) {
    if (!file.size) throw new Error("that file is empty");
    const bytes = new Uint8Array(await file.arrayBuffer());
    const sha256 = await sha256hex(bytes);
    showUpload(name, 0);
    let info = null;
    const pauses = { n: 0 };
    for (let attempt = 0; attempt < 4 && !info; ) {
      const reply = await request(Object.assign({ type: "file_offer", name, size: bytes.length, sha256 }, target));
      info = reply.type === "file_ready" ? reply.file : await sendChunks(bytes, reply, name, pauses);
      if (info === AGAIN) info = null; // waited out a rate notice: not an attempt
      else attempt++;
    }
    if (!info) throw new Error("the files worker stopped answering (send it again: it resumes)");
    showUpload(name, 1);
    return info;
  }

  // A file's name as the files worker takes it (imcli.core.text.plain_file_name, more bluntly): what would not draw as
  // itself (controls, format characters such as a bidi override, separators, blank letters, unassigned) and
  // slashes become "_", so a browser file of any name is sent, not refused.
  function plainName(name, fallback) {
    const plain = name.slice(-255).replace(/[\p{Cc}\p{Cf}\p{Cs}\p{Zl}\p{Zp}\p{Cn}\u115f\u1160\u3164\uffa0\\/]/gu, "_");
    return plain && plain !== "." && plain !== ".." ? plain : fallback;
  }

  // An avatar is a file of the default room (readable by everyone, as profiles are), as imcli profile set --avatar.
  async function setAvatar(file) {
    const name = plainName(file.name, "avatar");
    try {
      if (file.size > 5 << 20) throw new Error("an avatar is at most 5 MiB");
      const info = await storeFile(file, name, { room: "lobby" });
      if (!IMAGE_TYPES.includes(info.mime)) throw new Error("that is not a PNG, JPEG, GIF or WebP image");
      const avatar = { file: info.id, media_type: info.mime, thumbnail: info.thumb || "" };
      const r = await request({ type: "profile_set", avatar, clear_avatar: false });
      for (const prof of records(r.profiles, "profile")) if (prof.account === S.me) S.profiles.set(S.me, prof);
      setStatus("avatar saved");
      renderPeople();
      if (S.card === S.me) renderCard();
    } catch (e) {
      setStatus(`avatar: ${e.message}`, true);
    } finally {
      setTimeout(() => showUpload("", null), 800);
    }
  }

  async function sendFile(file) {
    const conv = S.current;
    if (!conv || !file) return;
    const name = plainName(file.name, "file");
    try {
      const target = await fileTarget(conv);
      const info = await storeFile(file, name, target);
      const carried = Object.assign({}, info);
      delete carried.sender; delete carried.place; delete carried.ts;
      let msg = { type: "chat", v: 1, id: newId(), ts: Date.now() / 1000, text: describe(info), file: carried };
      if (enc.encode(JSON.stringify(msg)).length > MAX_PAYLOAD) { delete carried.thumb; msg = Object.assign({}, msg, { file: carried }); }
      const topic = target.room ? T.room(conv.name, S.me) : target.group ? T.group(conv.name, S.me) : T.dm(conv.name, S.me);
      publish(topic, msg);
      addMessage(conv, { from: S.me, id: msg.id, ts: msg.ts, text: msg.text, file: fileInfo(carried) }, true);
      setStatus(`sent ${name}`);
    } catch (e) {
      setStatus(`${name}: ${e.message}`, true);
    } finally {
      setTimeout(() => showUpload("", null), 800);
    }
  }

  // Fetch a file whole into memory; the worker's own record (file_ready) names its type and hash.
  function fetchFile(id, onProgress) {
    return new Promise((resolve, reject) => {
      const stream = newId();
      const parts = [];
      let have = 0;
      let told = 0;
      let info = null;
      let stall = null;
      const ackTopic = `${PREFIX}/fetch/${S.me}/${stream}`;
      const ack = () => { told = have; publish(ackTopic, { type: "file_ack", v: 1, offset: have }); };
      let pauses = 0;
      const finish = (err, value) => {
        clearTimeout(stall);
        if (S.downloads.delete(stream)) S.client.unsubscribe(fileTopic(stream));
        S.rated.delete(stream);
        if (err) reject(err); else resolve(value);
      };
      const wait = (ms = STALL) => { clearTimeout(stall); stall = setTimeout(() => finish(new Error("the download stopped: try again")), ms); };
      S.rated.set(stream, (n) => { // our acknowledgement was dropped: wait, and send it again from where we are
        const ms = ratePause(n, pauses++);
        if (ms instanceof Error) return finish(ms);
        wait(STALL + ms); // chunks still on their way reset it; the resent acknowledgement is timed apart
        setTimeout(() => { if (S.rated.has(stream)) { wait(); ack(); } }, ms);
      });
      S.downloads.set(stream, async (payload) => {
        if (!info || payload.length <= CHUNK_HEADER) return;
        const offset = Number(new DataView(payload.buffer, payload.byteOffset, CHUNK_HEADER).getBigUint64(0));
        const data = new Uint8Array(payload.subarray(CHUNK_HEADER)); // a copy: the buffer is mqtt.js's
        if (offset !== have || have + data.length > info.size) return; // a duplicate (QoS 1)
        parts.push(data);
        have += data.length;
        wait();
        if (onProgress) onProgress(have / info.size);
        if (have - told >= ACK_EVERY || have === info.size) ack();
        if (have === info.size) {
          const blob = new Blob(parts, { type: IMAGE_TYPES.includes(info.mime) ? info.mime : "application/octet-stream" });
          const digest = await sha256hex(new Uint8Array(await blob.arrayBuffer()));
          if (digest !== info.sha256) finish(new Error(`${info.name} arrived damaged (its sha256 does not match)`));
          else finish(null, { info, blob });
        }
      });
      // its chunks' topic subscribed (SUBACK) before the worker is asked to send them
      S.client.subscribe(fileTopic(stream), { qos: 1 }, (err, granted) => {
        if (err || !granted || !granted.length || granted[0].qos === 128) return finish(new Error("the broker refused the download's topic"));
        request({ type: "file_get", file: id, stream, offset: 0 }).then((head) => {
          if (head.type !== "file_ready" || !head.file) return finish(new Error("the files worker sent something else"));
          info = head.file;
          wait();
          ack();
        }, (e) => finish(e));
      });
    });
  }

  function fileBox(f) {
    const box = el("span", "file");
    const image = IMAGE_TYPES.includes(f.mime);
    if (image && f.thumb) {
      const img = el("img", "thumb");
      img.alt = f.name;
      if (setUrl(img, "src", `data:image/jpeg;base64,${f.thumb}`)) box.append(img);
    }
    const extra = f.width && f.height ? ` · ${f.width}×${f.height}` : "";
    box.append(said(f.name, "name"), el("span", "meta", ` ${humanSize(f.size)}${extra}`));
    const get = el("button", "secondary small", image ? "Show full image" : "Download");
    const bar = el("progress");
    bar.max = 1;
    bar.hidden = true;
    get.addEventListener("click", async () => {
      get.disabled = true;
      bar.hidden = false;
      try {
        const { info, blob } = await fetchFile(f.id, (x) => { bar.value = x; });
        const url = URL.createObjectURL(blob);
        if (IMAGE_TYPES.includes(blob.type)) {
          const img = box.querySelector("img") || el("img", "full");
          img.className = "full";
          img.alt = info.name;
          if (setUrl(img, "src", url)) box.prepend(img);
        }
        const save = el("a", "save", "Save");
        setUrl(save, "href", url);
        save.download = plainName(String(info.name), "file"); // the worker's name; no path, whatever it says
        get.replaceWith(save);
      } catch (e) {
        get.disabled = false;
        setStatus(e.message, true);
      } finally {
        bar.hidden = true;
      }
    });
    box.append(document.createElement("br"), get, bar);
    return box;
  }

  // ------------------------------------------------------------------ rendering
  function setStatus(text, bad) {
    const s = $("status");
    s.replaceChildren(said(text)); // a worker's or a notice's text, which may quote what someone typed
    s.classList.toggle("error", !!bad);
  }
  const setConn = (text) => { $("conn").textContent = text; };

  function scrollDown() {
    const log = $("log");
    log.scrollTop = log.scrollHeight;
  }

  function clock(ts) {
    const d = new Date(ts * 1000);
    return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function messageItem(m) {
    if (m.system) {
      const line = el("li", m.bad ? "system error" : "system");
      line.append(said(m.text));
      return line;
    }
    const li = el("li", ["message", m.mention && "mention", m.pending && "pending", m.failed && "failed"].filter(Boolean).join(" "));
    li.dataset.from = m.from;
    li.dataset.id = m.id;
    li.append(el("span", "time", clock(m.ts)), said(nickOf(m.from), "from"));
    if (m.file) li.append(fileBox(m.file)); else li.append(said(m.text, "text"));
    if (m.pending || m.failed) li.append(el("span", "state", m.pending ? "sending…" : "not sent"));
    return li;
  }

  function renderMessages() {
    const list = $("messages");
    list.replaceChildren(...(S.current ? S.current.messages.map(messageItem) : []));
    $("older").hidden = !(S.current && S.current.more);
    scrollDown();
  }

  function renderHeader() {
    const conv = S.current;
    $("conv-title").replaceChildren(conv ? said(label(conv)) : "");
    const g = conv && conv.kind === "group" ? S.groups.get(conv.name) : null;
    $("group-bar").hidden = !(conv && conv.kind === "group");
    if (conv && conv.kind === "group") {
      const members = g ? g.members.map(nickOf).join(", ") : "not a member (or no such group)";
      $("group-members").replaceChildren(said(`members: ${members}${g && g.private ? " · private" : ""}`));
    }
  }

  function convItem(conv) {
    const li = el("li", conv === S.current ? "current" : "");
    li.dataset.key = conv.key;
    const name = conv.kind === "dm" ? `@${nickOf(conv.name)}` : label(conv);
    li.append(said(name));
    if (conv.unread) li.append(el("span", conv.mentioned ? "badge mention" : "badge", String(conv.unread)));
    li.addEventListener("click", () => open(conv));
    return li;
  }

  function renderConvs() {
    const by = (kind) => [...S.convs.values()].filter((c) => c.kind === kind).sort((a, b) => a.name.localeCompare(b.name));
    $("rooms").replaceChildren(...by("room").map(convItem));
    $("dms").replaceChildren(...by("dm").map(convItem));
    $("groups").replaceChildren(...by("group").map(convItem));
    const unread = [...S.convs.values()].reduce((n, c) => n + c.unread, 0);
    document.title = unread ? `(${unread}) imcli` : "imcli";
  }

  function renderGroups() {
    for (const [name, g] of S.groups) if (g.members.includes(S.me)) conversation("group", name);
    const pub = $("public-groups");
    pub.replaceChildren(...S.publicGroups.filter((n) => !(S.groups.get(n) || { members: [] }).members.includes(S.me)).map((name) => {
      const li = el("li");
      const b = el("button", "secondary small", "join");
      b.addEventListener("click", async () => { if (await groupOp("join", name)) open(conversation("group", name)); });
      li.append(said(`#${name}`), b);
      return li;
    }));
    renderConvs();
  }

  function renderFriends() {
    const f = S.friends;
    $("incoming").replaceChildren(...f.incoming.map((who) => {
      const li = el("li", "request");
      const yes = el("button", "small", "accept");
      const no = el("button", "secondary small", "decline");
      yes.addEventListener("click", () => friendOp("accept", who));
      no.addEventListener("click", () => friendOp("decline", who));
      li.append(said(`${who} wants to be your friend`), yes, no);
      return li;
    }));
    $("friends").replaceChildren(...[...f.friends.map((w) => [w, ""]), ...f.outgoing.map((w) => [w, " (asked)"])].map(([who, note]) => {
      const li = el("li", "friend");
      const p = S.presence.get(who);
      li.append(el("span", p && p.state === "online" ? "dot online" : "dot"), said(nickOf(who) + note));
      if (!note) li.addEventListener("click", () => open(conversation("dm", who)));
      return li;
    }));
  }

  function renderPeople() {
    const people = [...S.presence.values()].sort((a, b) => (a.state === b.state ? a.nick.localeCompare(b.nick) : a.state === "online" ? -1 : 1));
    $("people").replaceChildren(...people.map((p) => {
      const li = el("li", p.state === "online" ? "person online" : "person");
      li.dataset.account = p.account;
      const prof = S.profiles.get(p.account);
      const face = prof && prof.avatar ? thumbnailUrl(prof.avatar.thumbnail) : null;
      li.append(el("span", p.state === "online" ? "dot online" : "dot"));
      const img = el("img", "face");
      img.alt = "";
      if (setUrl(img, "src", face)) li.append(img);
      li.append(said(p.nick), el("span", "muted", p.nick !== p.account ? `(${p.account})` : ""));
      if (prof && prof.signature) li.append(said(prof.signature, "sig"));
      li.addEventListener("click", () => { S.card = p.account; renderCard(); });
      return li;
    }));
    renderFriends();
  }

  function renderMe() {
    $("me-nick").textContent = S.nick || S.me;
    $("me-account").textContent = S.me;
  }

  function signedOut(text) {
    $("app").hidden = true;
    $("signin").hidden = false;
    $("signin-error").textContent = text || "";
  }

  // ------------------------------------------------------------------ wiring
  function start() {
    const form = $("signin-form");
    const fail = (e) => { $("signin-error").textContent = e.message; $("signin-button").disabled = false; };
    const enter = async (account, password) => {
      await signIn(account, password);
      $("signin").hidden = true;
      $("app").hidden = false;
      $("password").value = "";
      S.nick = S.nick || account;
      renderMe();
      open(conversation("room", "lobby"));
      if ("Notification" in window && Notification.permission === "default") Notification.requestPermission().catch(() => {});
    };
    const fields = () => {
      const account = $("account").value.trim().toLowerCase();
      if (!NAME.test(account)) throw new Error("an account name is 1-32 characters: a-z, 0-9, '_' or '-', starting with a letter or digit");
      return [account, $("password").value];
    };
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      $("signin-button").disabled = true;
      try { await enter(...fields()); } catch (e) { fail(e); }
    });
    $("register-button").addEventListener("click", async () => {
      try {
        const [account, password] = fields();
        if (password.length < 8) throw new Error("a password has at least 8 characters");
        await register(account, password, $("invite").value.trim());
        await enter(account, password);
      } catch (e) { fail(e); }
    });
    $("composer").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const text = $("text").value;
      $("text").value = "";
      send(text);
    });
    $("room-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const room = $("room-input").value.trim().replace(/^#/, "").toLowerCase();
      if (!NAME.test(room)) return setStatus(`invalid room name`, true);
      $("room-input").value = "";
      open(conversation("room", room));
    });
    $("dm-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const name = $("dm-input").value.trim().replace(/^@/, "");
      if (!name) return;
      try {
        const r = await request({ type: "resolve", name });
        $("dm-input").value = "";
        open(conversation("dm", r.account));
      } catch (e) { setStatus(`unknown recipient: ${e.message}`, true); }
    });
    const groupName = () => {
      const g = $("group-input").value.trim().replace(/^#/, "").toLowerCase();
      if (!NAME.test(g)) { setStatus("invalid group name", true); return null; }
      return g;
    };
    $("group-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const g = groupName();
      if (g && (await groupOp("join", g))) { $("group-input").value = ""; open(conversation("group", g)); }
    });
    $("group-create").addEventListener("click", async () => {
      const g = groupName();
      if (g && (await groupOp("create", g, null, $("group-private").checked))) { $("group-input").value = ""; open(conversation("group", g)); }
    });
    const member = () => $("member-input").value.trim().replace(/^@/, "").toLowerCase();
    $("member-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      if (S.current && (await groupOp("invite", S.current.name, member()))) { $("member-input").value = ""; renderHeader(); }
    });
    $("kick-button").addEventListener("click", async () => {
      if (S.current && (await groupOp("kick", S.current.name, member()))) { $("member-input").value = ""; renderHeader(); }
    });
    $("leave-button").addEventListener("click", async () => {
      const conv = S.current;
      if (conv && (await groupOp("leave", conv.name))) {
        S.convs.delete(conv.key);
        S.groups.delete(conv.name);
        open(conversation("room", "lobby"));
      }
    });
    $("friend-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const who = $("friend-input").value.trim().replace(/^@/, "").toLowerCase();
      $("friend-input").value = "";
      if (who) friendOp("add", who);
    });
    $("rename-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const nick = $("rename-input").value.trim().normalize("NFC");
      if (!nick || [...nick].length > 32) return setStatus("a display name is 1 to 32 characters", true);
      try {
        const r = await request({ type: "rename", nick });
        S.nick = r.nick;
        $("rename-input").value = "";
        renderMe();
      } catch (e) { setStatus(`rename: ${e.message}`, true); }
    });
    $("file-input").addEventListener("change", () => {
      const file = $("file-input").files[0];
      $("file-input").value = "";
      if (file) sendFile(file);
    });
    $("profile-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      try {
        const r = await request({ type: "profile_set", signature: $("signature-input").value.trim(), about: $("about-input").value, clear_avatar: false });
        for (const prof of records(r.profiles, "profile")) if (prof.account === S.me) S.profiles.set(S.me, prof);
        $("my-profile").open = false;
        setStatus("profile saved");
        renderPeople();
      } catch (e) { setStatus(`profile: ${e.message}`, true); }
    });
    $("avatar-input").addEventListener("change", () => {
      const file = $("avatar-input").files[0];
      $("avatar-input").value = "";
      if (file) setAvatar(file);
    });
    $("moments-open").addEventListener("click", () => showMoments(true));
    $("feed-older").addEventListener("click", () => loadFeed(true));
    $("moment-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const text = $("moment-text").value.trim();
      if (!text) return;
      const r = await momentOp({ op: "post", text });
      if (r && record((r.moments || [])[0], "moment")) {
        $("moment-text").value = "";
        S.feed = [r.moments[0]].concat(S.feed || []);
        renderFeed();
      }
    });
    $("card-dm").addEventListener("click", () => { if (S.card && S.card !== S.me) open(conversation("dm", S.card)); });
    $("older").addEventListener("click", () => S.current && loadHistory(S.current, true));
    const last = localStorage.getItem("imcli.last");
    if (last && NAME.test(last) && storedCredential(last)) {
      $("account").value = last;
      enter(last, "").catch(fail); // this browser's device credential: no password needed
    }
    $("signout").addEventListener("click", async () => { await signOut(); location.reload(); });
    $("menu").addEventListener("click", () => document.body.classList.toggle("show-menu"));
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible" && S.current) { S.current.unread = 0; S.current.mentioned = false; renderConvs(); }
    });
    window.addEventListener("pagehide", () => { if (S.client && S.client.connected) disconnect(); });
  }

  start();
})();
