#!/usr/bin/env node
// Independent verifier of fedmq test vectors, written from docs/PROTOCOL.md only.
//
//   node tests/interop/verify_vectors.mjs [VECTORS_DIR]     (default: docs/vectors)
//
// Node 20, no npm packages: a small CBOR decoder (RFC 8949), Ed25519 and SHA-256 from
// node:crypto. For every entry of VECTORS_DIR/index.json it checks the COSE_Sign1
// envelope, the kid against the signer's public key, the signature with the topic as
// external_aad, the manifest, the chunk header; it reassembles chunked messages, checks
// size and SHA-256, decodes the body, checks it against its kind, and checks every
// tensor (shape x itemsize == byte length, sparse/quantized rules, finite values).
// One line per index entry ("OK ..." or "FAIL ..."), then a summary; exit status 1 if
// anything failed.

import { createHash, createPublicKey, verify as edVerify } from "node:crypto";
import { readFileSync } from "node:fs";
import { basename, join } from "node:path";

// ------------------------------------------------------------------ CBOR decoding

class Tagged {
  constructor(tag, value) { this.tag = tag; this.value = value; }
}
class Float { // keeps "this was a CBOR float" (major type 7), which some fields require
  constructor(value) { this.value = value; }
}
const UNDEFINED = Symbol("undefined");
class CborError extends Error {}

const MAX_DEPTH = 16;

function halfToNumber(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * 2 ** -14 * (frac / 1024);
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * 2 ** (exp - 15) * (1 + frac / 1024);
}

function decodeCbor(bytes) {
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let pos = 0;

  const need = (n) => {
    if (pos + n > buf.length) throw new CborError("truncated CBOR item");
  };
  const readArg = (info) => {
    if (info < 24) return info;
    if (info === 24) { need(1); return buf[pos++]; }
    if (info === 25) { need(2); const v = buf.readUInt16BE(pos); pos += 2; return v; }
    if (info === 26) { need(4); const v = buf.readUInt32BE(pos); pos += 4; return v; }
    if (info === 27) {
      need(8);
      const v = buf.readBigUInt64BE(pos); pos += 8;
      return v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
    }
    throw new CborError(`reserved additional information ${info}`);
  };
  const asLength = (n) => {
    if (typeof n === "bigint" || n > buf.length) throw new CborError("length exceeds the input");
    return n;
  };
  const keyOf = (k) => {
    if (k instanceof Uint8Array) return "b:" + Buffer.from(k).toString("hex");
    if (typeof k === "string") return "s:" + k;
    if (typeof k === "number" || typeof k === "bigint") return "i:" + k.toString();
    if (k instanceof Float) return "f:" + k.value;
    return "o:" + JSON.stringify(k, (_, v) => (typeof v === "bigint" ? v.toString() : v));
  };

  const item = (depth) => {
    need(1);
    const ib = buf[pos++];
    const major = ib >> 5;
    const info = ib & 0x1f;
    if (info === 31) return indefinite(major, depth);
    switch (major) {
      case 0: return readArg(info);
      case 1: {
        const n = readArg(info);
        return typeof n === "bigint" ? -1n - n : -1 - n;
      }
      case 2: {
        const n = asLength(readArg(info)); need(n);
        const out = new Uint8Array(buf.subarray(pos, pos + n)); pos += n;
        return out;
      }
      case 3: {
        const n = asLength(readArg(info)); need(n);
        const out = new TextDecoder("utf-8", { fatal: true }).decode(buf.subarray(pos, pos + n)); pos += n;
        return out;
      }
      case 4: {
        if (depth >= MAX_DEPTH) throw new CborError("nesting deeper than 16");
        const n = asLength(readArg(info));
        const out = [];
        for (let i = 0; i < n; i++) out.push(item(depth + 1));
        return out;
      }
      case 5: {
        if (depth >= MAX_DEPTH) throw new CborError("nesting deeper than 16");
        const n = asLength(readArg(info));
        const out = new Map();
        const seen = new Set();
        for (let i = 0; i < n; i++) {
          const k = item(depth + 1);
          const kk = keyOf(k);
          if (seen.has(kk)) throw new CborError("duplicate map key");
          seen.add(kk);
          out.set(k, item(depth + 1));
        }
        return out;
      }
      case 6: {
        const tag = readArg(info);
        return new Tagged(tag, item(depth));
      }
      case 7: {
        if (info < 20) return new Tagged(-1, info); // unassigned simple value
        if (info === 20) return false;
        if (info === 21) return true;
        if (info === 22) return null;
        if (info === 23) return UNDEFINED;
        if (info === 24) { need(1); pos++; return new Tagged(-1, buf[pos - 1]); }
        if (info === 25) { need(2); const v = halfToNumber(buf.readUInt16BE(pos)); pos += 2; return new Float(v); }
        if (info === 26) { need(4); const v = buf.readFloatBE(pos); pos += 4; return new Float(v); }
        if (info === 27) { need(8); const v = buf.readDoubleBE(pos); pos += 8; return new Float(v); }
        throw new CborError(`reserved simple value ${info}`);
      }
    }
    throw new CborError("unreachable");
  };

  const isBreak = () => { need(1); return buf[pos] === 0xff; };
  const indefinite = (major, depth) => {
    if (major === 2 || major === 3) {
      const parts = [];
      while (!isBreak()) {
        const ib = buf[pos];
        if (ib >> 5 !== major || (ib & 0x1f) === 31) throw new CborError("bad indefinite-length string chunk");
        parts.push(item(depth));
      }
      pos++;
      return major === 2 ? new Uint8Array(Buffer.concat(parts)) : parts.join("");
    }
    if (depth >= MAX_DEPTH) throw new CborError("nesting deeper than 16");
    if (major === 4) {
      const out = [];
      while (!isBreak()) out.push(item(depth + 1));
      pos++;
      return out;
    }
    if (major === 5) {
      const out = new Map();
      const seen = new Set();
      while (!isBreak()) {
        const k = item(depth + 1);
        const kk = keyOf(k);
        if (seen.has(kk)) throw new CborError("duplicate map key");
        seen.add(kk);
        out.set(k, item(depth + 1));
      }
      pos++;
      return out;
    }
    throw new CborError(`indefinite length not allowed for major type ${major}`);
  };

  const value = item(0);
  if (pos !== buf.length) throw new CborError(`${buf.length - pos} bytes after the CBOR item`);
  return value;
}

// ------------------------------------------------------------------ CBOR encoding (Sig_structure only)

function head(major, n) {
  if (n < 24) return Buffer.from([(major << 5) | n]);
  if (n < 0x100) return Buffer.from([(major << 5) | 24, n]);
  if (n < 0x10000) { const b = Buffer.alloc(3); b[0] = (major << 5) | 25; b.writeUInt16BE(n, 1); return b; }
  if (n < 0x100000000) { const b = Buffer.alloc(5); b[0] = (major << 5) | 26; b.writeUInt32BE(n, 1); return b; }
  const b = Buffer.alloc(9); b[0] = (major << 5) | 27; b.writeBigUInt64BE(BigInt(n), 1); return b;
}
const bstr = (bytes) => Buffer.concat([head(2, bytes.length), Buffer.from(bytes)]);
const tstr = (s) => { const b = Buffer.from(s, "utf-8"); return Buffer.concat([head(3, b.length), b]); };

function sigStructure(protectedBytes, topic, payload) {
  return Buffer.concat([head(4, 4), tstr("Signature1"), bstr(protectedBytes), bstr(Buffer.from(topic, "utf-8")), bstr(payload)]);
}

// ------------------------------------------------------------------ helpers

class Reject extends Error {
  constructor(reason, detail) { super(`${reason}: ${detail}`); this.reason = reason; }
}
const fail = (reason, detail) => { throw new Reject(reason, detail); };

const hex = (b) => Buffer.from(b).toString("hex");
const sha256 = (b) => createHash("sha256").update(b).digest();
const isBytes = (v) => v instanceof Uint8Array;
const isMap = (v) => v instanceof Map;
const isUint = (v) => (typeof v === "number" && Number.isInteger(v) && v >= 0) || (typeof v === "bigint" && v >= 0n);
const isInt = (v) => (typeof v === "number" && Number.isInteger(v)) || typeof v === "bigint";
const isNumber = (v) => isInt(v) || v instanceof Float;
const textKeysOnly = (m) => [...m.keys()].every((k) => typeof k === "string");

function decodeOr(reason, bytes, what) {
  try {
    return decodeCbor(bytes);
  } catch (e) {
    if (e instanceof CborError || e instanceof TypeError) fail(reason, `${what}: ${e.message}`);
    throw e;
  }
}

// ------------------------------------------------------------------ envelope (PROTOCOL.md sections 4-6)

const MANIFEST_FIELDS = {
  v: isUint, kind: (v) => typeof v === "string", job: (v) => typeof v === "string",
  sender: (v) => typeof v === "string", topic: (v) => typeof v === "string", seq: isUint, ts: isUint,
  version: isUint, round: isUint, size: isUint, sha256: isBytes, chunks: isUint,
};

function loadKey(dir, file) {
  const key = createPublicKey(readFileSync(join(dir, file)));
  if (key.asymmetricKeyType !== "ed25519") throw new Error(`${file} is not an Ed25519 key`);
  const raw = Buffer.from(key.export({ format: "jwk" }).x, "base64url");
  return { key, raw, kid: sha256(raw).subarray(0, 16), name: basename(file).replace(/\.pub$/, "") };
}

function parseEnvelope(payload) {
  if (payload.length === 0) fail("malformed", "zero-length payload (a retained delete, not a message)");
  const top = decodeOr("malformed", payload, "envelope");
  if (!(top instanceof Tagged) || top.tag !== 18) fail("malformed", "not a tagged COSE_Sign1 (tag 18)");
  const arr = top.value;
  if (!Array.isArray(arr) || arr.length !== 4) fail("malformed", "COSE_Sign1 must be a 4-element array");
  const [prot, unprot, manifestBytes, signature] = arr;
  if (!isBytes(prot) || !isMap(unprot) || !isBytes(manifestBytes) || !isBytes(signature)) {
    fail("malformed", "COSE_Sign1 element types");
  }
  if (signature.length !== 64) fail("malformed", "signature is not 64 bytes");
  const hdr = prot.length ? decodeOr("malformed", prot, "protected header") : new Map();
  if (!isMap(hdr)) fail("malformed", "protected header is not a map");
  if (hdr.get(1) !== -8) fail("unsupported_alg", `alg ${hdr.get(1)}`);
  const kid = hdr.get(4);
  if (!isBytes(kid) || kid.length !== 16) fail("malformed", "kid must be a 16-byte string");
  const part = unprot.get(-65537);
  if (!isBytes(part)) fail("malformed", "no body (-65537) in the unprotected header");
  let chunk = null;
  if (unprot.has(-65538)) {
    const c = unprot.get(-65538);
    if (!Array.isArray(c) || c.length !== 2 || !isUint(c[0]) || !isUint(c[1]) || !(c[0] < c[1])) {
      fail("bad_chunk", "chunk header must be [index, count], 0 <= index < count");
    }
    chunk = [Number(c[0]), Number(c[1])];
  }
  return { prot, kid, manifestBytes, signature, part, chunk };
}

function parseManifest(bytes) {
  if (bytes.length > 1024) fail("malformed", "manifest larger than 1024 bytes");
  const m = decodeOr("malformed", bytes, "manifest");
  if (!isMap(m) || !textKeysOnly(m)) fail("malformed", "manifest is not a map with text keys");
  if (m.get("v") !== 1) fail("bad_version", `protocol version ${m.get("v")}`);
  const keys = [...m.keys()].sort();
  const want = Object.keys(MANIFEST_FIELDS).sort();
  if (keys.join(",") !== want.join(",")) fail("malformed", `manifest keys ${keys.join(",")}`);
  for (const [k, ok] of Object.entries(MANIFEST_FIELDS)) {
    if (!ok(m.get(k))) fail("malformed", `manifest field ${k} has the wrong type`);
  }
  if (m.get("sha256").length !== 32 || !(m.get("chunks") >= 1)) fail("malformed", "sha256/chunks out of range");
  return Object.fromEntries(m);
}

// ------------------------------------------------------------------ tensors (section 8)

const TYPED = { // tag -> [kind, itemsize, littleEndian]
  64: ["u", 1, true], 65: ["u", 2, false], 66: ["u", 4, false], 67: ["u", 8, false],
  69: ["u", 2, true], 70: ["u", 4, true], 71: ["u", 8, true],
  72: ["i", 1, true], 73: ["i", 2, false], 74: ["i", 4, false], 75: ["i", 8, false],
  77: ["i", 2, true], 78: ["i", 4, true], 79: ["i", 8, true],
  80: ["f", 2, false], 81: ["f", 4, false], 82: ["f", 8, false],
  84: ["f", 2, true], 85: ["f", 4, true], 86: ["f", 8, true],
};
const DTYPE = { u: "uint", i: "int", f: "float" };

function checkDense(item, budget) {
  if (!(item instanceof Tagged) || item.tag !== 40) fail("bad_tensor", "tensor must be tag 40 [shape, typed array]");
  const v = item.value;
  if (!Array.isArray(v) || v.length !== 2) fail("bad_tensor", "tag 40 content must be [shape, typed array]");
  const [shape, arr] = v;
  if (!Array.isArray(shape) || shape.length > 8 || !shape.every((d) => typeof d === "number" && isUint(d))) {
    fail("bad_tensor", "shape must be an array of at most 8 non-negative ints");
  }
  const n = shape.reduce((a, d) => a * d, 1);
  if (n > 64 * 2 ** 20 || shape.some((d) => d > 64 * 2 ** 20)) fail("too_large", "tensor exceeds 64 Mi elements");
  budget.elements += n;
  if (budget.elements > 256 * 2 ** 20) fail("too_large", "message exceeds 256 Mi elements");
  if (!(arr instanceof Tagged) || !(arr.tag in TYPED)) fail("bad_tensor", `element array tag ${arr?.tag} is not an accepted typed array`);
  if (!isBytes(arr.value)) fail("bad_tensor", "typed array content must be a byte string");
  const [kind, size, le] = TYPED[arr.tag];
  if (n * size !== arr.value.length) {
    fail("bad_tensor", `shape [${shape}] x ${size} B = ${n * size} B, typed array holds ${arr.value.length} B`);
  }
  return { shape, n, kind, size, le, tag: arr.tag, bytes: arr.value, dtype: `${DTYPE[kind]}${size * 8}` };
}

function readElement(t, i) {
  const b = Buffer.from(t.bytes.buffer, t.bytes.byteOffset, t.bytes.byteLength);
  const o = i * t.size;
  if (t.kind === "f") {
    if (t.size === 2) return halfToNumber(t.le ? b.readUInt16LE(o) : b.readUInt16BE(o));
    if (t.size === 4) return t.le ? b.readFloatLE(o) : b.readFloatBE(o);
    return t.le ? b.readDoubleLE(o) : b.readDoubleBE(o);
  }
  const base = { 1: "Int8", 2: "Int16", 4: "Int32", 8: "BigInt64" }[t.size];
  const name = "read" + (t.kind === "u" ? base.replace("Int", "UInt") : base) + (t.size === 1 ? "" : t.le ? "LE" : "BE");
  const v = b[name](o);
  return typeof v === "bigint" ? Number(v) : v;
}

function checkFinite(t, name) {
  if (t.kind !== "f") return;
  for (let i = 0; i < t.n; i++) {
    if (!Number.isFinite(readElement(t, i))) fail("non_finite", `${name} holds NaN or Inf`);
  }
}

// Returns a description {form, dtype, shape} of any tensor item.
function checkTensor(item, budget, name, finite) {
  if (item instanceof Tagged) {
    const t = checkDense(item, budget);
    if (finite) checkFinite(t, name);
    return { form: "dense", dtype: t.dtype + (t.le || t.size === 1 ? "" : "be"), shape: t.shape, n: t.n };
  }
  if (Array.isArray(item) && item.length === 2 && item[0] === "bfloat16") {
    const t = checkDense(item[1], budget);
    if (t.size !== 2 || t.kind === "f") fail("bad_tensor", "bfloat16 bits must travel as a 16-bit integer array");
    if (finite) {
      for (let i = 0; i < t.n; i++) {
        const bits = readElement({ ...t, kind: "u" }, i);
        if (((bits >> 7) & 0xff) === 0xff) fail("non_finite", `${name} holds NaN or Inf`);
      }
    }
    return { form: "bfloat16", dtype: "bfloat16", shape: t.shape, n: t.n };
  }
  if (isMap(item) && item.size === 1) {
    const [[form, body]] = [...item.entries()];
    if (form === "coo") {
      if (!isMap(body) || body.size !== 3 || !["shape", "indices", "values"].every((k) => body.has(k))) {
        fail("bad_tensor", "coo needs exactly shape, indices, values");
      }
      const shape = body.get("shape");
      if (!Array.isArray(shape) || shape.length > 8 || !shape.every((d) => typeof d === "number" && isUint(d))) {
        fail("bad_tensor", "coo shape must be an array of at most 8 non-negative ints");
      }
      const n = shape.reduce((a, d) => a * d, 1);
      budget.elements += n;
      const idx = checkDense(body.get("indices"), budget);
      if (idx.kind !== "i" || ![2, 4, 8].includes(idx.size) || idx.shape.length !== 1) {
        fail("bad_tensor", "coo indices must be a 1-D int16/int32/int64 array");
      }
      if (idx.n > n) fail("bad_tensor", "coo holds more indices than the tensor has elements");
      const values = checkTensor(body.get("values"), budget, `${name}.values`, finite);
      if (values.shape.length !== 1 || values.n !== idx.n) fail("bad_tensor", "coo values must be 1-D and match the indices");
      for (let i = 0; i < idx.n; i++) {
        const at = readElement(idx, i);
        if (at < 0 || at >= n) fail("bad_tensor", `coo index ${at} out of range for ${n} elements`);
      }
      return { form: "coo", dtype: values.dtype, shape, n, nnz: idx.n };
    }
    if (form === "q8") {
      // one scale (a CBOR float) for the tensor, or "block" and one float32 scale per block
      const blocked = isMap(body) && body.size === 4 && body.has("block");
      if (!isMap(body) || (body.size !== 3 && !blocked) || !["scale", "zero", "codes"].every((k) => body.has(k))) {
        fail("bad_tensor", "q8 needs exactly scale, zero, codes (and block for per-block scales)");
      }
      const scale = body.get("scale");
      const zero = body.get("zero");
      if (typeof zero !== "number" || !Number.isInteger(zero) || zero < -128 || zero > 127) fail("bad_tensor", "q8 zero must be an int8");
      const codes = checkDense(body.get("codes"), budget);
      if (codes.tag !== 72) fail("bad_tensor", "q8 codes must be int8 (tag 72)");
      if (blocked) {
        const block = body.get("block");
        if (typeof block !== "number" || !isUint(block) || block < 1) fail("bad_tensor", "q8 block must be a positive uint");
        const scales = checkDense(scale, budget);
        if (scales.dtype !== "float32" || scales.shape.length !== 1 || scales.n !== Math.ceil(codes.n / block)) {
          fail("bad_tensor", `q8 needs a 1-D float32 scale per block of ${block}: ${Math.ceil(codes.n / block)} scales`);
        }
        checkFinite(scales, `${name}.scale`);
        return { form: `q8/${block}`, dtype: "float32", shape: codes.shape, n: codes.n };
      }
      if (!(scale instanceof Float) || !Number.isFinite(scale.value)) fail("bad_tensor", "q8 scale must be a finite CBOR float");
      return { form: "q8", dtype: "float32", shape: codes.shape, n: codes.n };
    }
  }
  fail("bad_tensor", "unknown tensor form");
}

function checkStateDict(tensors, finite) {
  if (!isMap(tensors)) fail("bad_tensor", "tensors must be a map");
  if (tensors.size > 4096) fail("too_large", "more than 4096 tensors");
  const budget = { elements: 0 };
  const out = [];
  for (const [name, item] of tensors) {
    if (typeof name !== "string") fail("bad_tensor", "tensor names must be text");
    const d = checkTensor(item, budget, name, finite);
    out.push(`${name}:${d.form === "dense" ? "" : d.form + "/"}${d.dtype}[${d.shape.join("x")}]`);
  }
  return out;
}

// ------------------------------------------------------------------ message kinds (section 9)

const str = (v) => typeof v === "string";
// parts -> samples, in a model with parts (PROTOCOL.md 9.2, 9.6)
const isSampleMap = (v) => isMap(v) && v.size > 0 && [...v].every(([k, n]) => str(k) && isUint(n) && n >= 1);
// the part a tensor belongs to: the longest of `parts` followed by a dot (Appendix A)
const partOf = (name, parts) => parts.filter((p) => name.startsWith(p + ".")).sort((a, b) => b.length - a.length)[0];
const KINDS = {
  instruction: { topic: /\/instruction$/, fields: { run: str, task: str, model: isMap, train: isMap, update: str, requirements: isMap, round_policy: isMap },
    optional: { distill: isMap, multitask: isMap } },
  confirm: { topic: /\/confirm\/[^/]+$/, fields: { public_key: (v) => isBytes(v) && v.length === 32, samples: isUint, capabilities: isMap },
    optional: { parts: isSampleMap } },
  decline: { topic: /\/confirm\/[^/]+$/, fields: { public_key: (v) => isBytes(v) && v.length === 32, reason: str } },
  // model/PART: one part of a model that has parts (PROTOCOL.md 9.3); never model/chunk
  model: { topic: /\/(model(\/(?!chunk$)[A-Za-z0-9][A-Za-z0-9_.\-]{0,63})?|to\/[^/]+)$/, fields: { run: str, tensors: isMap },
    tensors: "finite" },
  delta: { topic: /\/delta$/, fields: { run: str, base_version: isUint, base_digest: (v) => isBytes(v) && v.length === 16, tensors: isMap },
    tensors: "any" },
  round: { topic: /\/round$/, fields: { run: str, participants: (v) => Array.isArray(v) && v.every(str),
    received: (v) => Array.isArray(v) && v.every(str), deadline: isNumber, update: str } },
  reconfirm: { topic: /\/to\/[^/]+$/, fields: { run: str, reason: str } },
  update: {
    topic: /\/update\/[^/]+$/,
    fields: { update_id: str, kind: (v) => ["delta", "gradient", "student"].includes(v), base_version: isUint,
      samples: (v) => isUint(v) && v >= 1, metrics: (v) => isMap(v) && [...v.values()].every(isNumber), tensors: isMap },
    optional: { parts: isSampleMap },
    tensors: "finite",
  },
  presence: { topic: /\/presence\/[^/]+$/, fields: { state: (v) => v === "online" || v === "offline", version: isInt } },
  // sharded jobs (section 9.9)
  tally: { topic: /\/partial\/[^/]+$/, fields: { run: str, updates: (v) => Array.isArray(v) && v.every(isMap) } },
  partial: { topic: /\/partial\/[^/]+$/, fields: { run: str, collect: isUint,
    updates: (v) => Array.isArray(v) && v.every(isMap), weight: isNumber, tensors: isMap }, tensors: "finite" },
  collect: { topic: /\/collect$/, fields: { run: str, collect: isUint, assign: isMap, deadline: isNumber } },
};

function checkBody(manifest, topic, body, kid, ownKey) {
  const spec = KINDS[manifest.kind];
  if (!spec || !spec.topic.test(topic)) fail("bad_kind", `${manifest.kind} is not expected on ${topic}`);
  for (const [field, ok] of Object.entries(spec.fields)) {
    if (!body.has(field) || !ok(body.get(field))) fail("bad_body", `${manifest.kind}.${field} missing or of the wrong type`);
  }
  for (const [field, ok] of Object.entries(spec.optional || {})) {
    if (body.has(field) && !ok(body.get(field))) fail("bad_body", `${manifest.kind}.${field} of the wrong type`);
  }
  const notes = [];
  const slaveId = topic.match(/\/(?:confirm|update|presence|partial)\/([^/]+)$/);
  if (slaveId && slaveId[1] !== manifest.sender) fail("wrong_sender", `topic names ${slaveId[1]}, sender is ${manifest.sender}`);
  if (manifest.kind === "confirm" || manifest.kind === "decline") {
    // a self-signed enrollment request carries the key that signed it
    if (!Buffer.from(sha256(body.get("public_key")).subarray(0, 16)).equals(Buffer.from(kid))) {
      fail("bad_signature", "public_key in the body does not hash to the kid");
    }
    if (!Buffer.from(body.get("public_key")).equals(ownKey)) fail("bad_signature", "public_key is not the signer's key");
  }
  if (manifest.kind === "update") {
    if (body.get("base_version") !== manifest.version) fail("bad_body", "base_version differs from manifest.version");
    const want = `${manifest.sender}/${manifest.round}/${manifest.version}`;
    if (body.get("update_id") !== want) fail("bad_body", `update_id ${body.get("update_id")}, expected ${want}`);
  }
  const part = manifest.kind === "model" && topic.match(/\/model\/([^/]+)$/);
  const parts = part ? [part[1]] : manifest.kind === "update" && body.has("parts") ? [...body.get("parts").keys()] : null;
  if (parts) {  // exactly the tensors of those parts
    const names = [...body.get("tensors").keys()];
    const stray = names.find((n) => !partOf(n, parts));
    if (stray !== undefined) fail("bad_tensor", `tensor ${stray} is not in ${parts.join(", ")}`);
    const empty = parts.find((p) => !names.some((n) => partOf(n, parts) === p));
    if (empty !== undefined) fail("bad_tensor", `no tensor of part ${empty}`);
    notes.push(`parts=${parts.join(",")}`);
  }
  if (spec.tensors) {
    const t = checkStateDict(body.get("tensors"), spec.tensors === "finite");
    notes.push(`tensors=${t.join(",")}`);
  }
  return notes;
}

// ------------------------------------------------------------------ main

function main() {
  const dir = process.argv[2] || "docs/vectors";
  const index = JSON.parse(readFileSync(join(dir, "index.json"), "utf-8"));
  const keys = new Map();
  const results = new Map(); // file -> {ok, line}
  const groups = new Map(); // message id -> {entries, parts, ...}
  const order = [];

  for (const entry of index) {
    const file = entry.file;
    try {
      if (!keys.has(entry.public_key)) keys.set(entry.public_key, loadKey(dir, entry.public_key));
      const key = keys.get(entry.public_key);
      const env = parseEnvelope(readFileSync(join(dir, file)));
      if (!Buffer.from(env.kid).equals(key.kid)) {
        fail("unknown_kid", `kid ${hex(env.kid)} is not SHA-256(${entry.public_key})[0:16] = ${hex(key.kid)}`);
      }
      const manifest = parseManifest(env.manifestBytes);
      const ok = edVerify(null, sigStructure(env.prot, entry.topic, env.manifestBytes), key.key, Buffer.from(env.signature));
      if (!ok) {
        const elsewhere = manifest.topic !== entry.topic
          && edVerify(null, sigStructure(env.prot, manifest.topic, env.manifestBytes), key.key, Buffer.from(env.signature));
        fail(elsewhere ? "wrong_topic" : "bad_signature", elsewhere ? `signed for ${manifest.topic}` : "Ed25519 signature does not verify for this key and topic");
      }
      if (manifest.topic !== entry.topic) fail("wrong_topic", `manifest names ${manifest.topic}`);
      if (manifest.sender !== key.name) fail("wrong_sender", `sender ${manifest.sender} signed with the key of ${key.name}`);
      if (manifest.kind !== entry.kind) fail("bad_kind", `manifest kind ${manifest.kind}, index says ${entry.kind}`);
      const count = Number(manifest.chunks);
      if ((env.chunk ? env.chunk[1] : 1) !== count || (count > 1) !== (env.chunk !== null)) {
        fail("bad_chunk", "chunk header disagrees with the signed chunk count");
      }
      const expected = entry.chunk ? entry.chunk.join("/") : "none";
      if ((env.chunk ? env.chunk.join("/") : "none") !== expected) fail("bad_chunk", `chunk header ${env.chunk}, index says ${expected}`);
      if (count > 16384 || count > manifest.size + 1) fail("too_large", `${count} chunks for ${manifest.size} B`);
      const id = `${hex(env.kid)}|${entry.topic}|${hex(env.manifestBytes)}`;
      if (!groups.has(id)) {
        groups.set(id, { entries: [], parts: new Map(), manifest, env, key, topic: entry.topic, failed: null });
        order.push(id);
      }
      const g = groups.get(id);
      g.entries.push(entry);
      if (!Buffer.from(env.prot).equals(Buffer.from(g.env.prot)) || !Buffer.from(env.signature).equals(Buffer.from(g.env.signature))) {
        fail("bad_chunk", "chunk does not repeat the signed header of its message");
      }
      const index_ = env.chunk ? env.chunk[0] : 0;
      if (!g.parts.has(index_)) g.parts.set(index_, env.part);
      results.set(file, { ok: true, group: id });
    } catch (e) {
      if (!(e instanceof Reject)) e = new Reject("error", e.message);
      results.set(file, { ok: false, line: `FAIL ${file}: ${e.reason}: ${e.message.replace(/^[a-z_]+: /, "")}` });
    }
  }

  // Whole messages: reassembly, replay order, size, digest, body, tensors.
  const lastSeq = new Map();
  for (const id of order) {
    const g = groups.get(id);
    const m = g.manifest;
    let line;
    try {
      const count = Number(m.chunks);
      for (let i = 0; i < count; i++) if (!g.parts.has(i)) fail("bad_chunk", `chunk ${i} of ${count} missing`);
      if (g.entries.some((e) => !results.get(e.file).ok)) fail("bad_chunk", "another chunk of this message failed");
      let held = 0;
      const slices = [];
      for (let i = 0; i < count; i++) { held += g.parts.get(i).length; slices.push(g.parts.get(i)); }
      if (held > m.size && count > 1) fail("bad_chunk", "chunks add up to more than the signed size");
      const body = Buffer.concat(slices);
      if (body.length !== m.size) fail("size_mismatch", `body is ${body.length} B, manifest says ${m.size} B`);
      if (!sha256(body).equals(Buffer.from(m.sha256))) fail("digest_mismatch", "body does not match the signed SHA-256");
      const replayKey = `${hex(g.env.kid)}|${g.topic}`;
      if (lastSeq.has(replayKey) && !(m.seq > lastSeq.get(replayKey))) fail("replay", `seq ${m.seq} <= ${lastSeq.get(replayKey)}`);
      lastSeq.set(replayKey, m.seq);
      const decoded = decodeOr("malformed", body, "body");
      if (!isMap(decoded) || !textKeysOnly(decoded)) fail("bad_body", "body must be a CBOR map with text keys");
      const notes = checkBody(m, g.topic, decoded, g.env.kid, g.key.raw);
      line = `kind=${m.kind} topic=${g.topic} sender=${m.sender} seq=${m.seq} version=${m.version} round=${m.round} `
        + `size=${m.size} sha256=ok${notes.length ? " " + notes.join(" ") : ""}`;
      for (const e of g.entries) {
        const chunk = e.chunk ? ` chunk=${e.chunk[0]}/${e.chunk[1]}` : "";
        results.set(e.file, { ok: true, line: `OK   ${e.file}${chunk} ${line}` });
      }
    } catch (e) {
      if (!(e instanceof Reject)) e = new Reject("error", e.message);
      for (const entry of g.entries) {
        if (results.get(entry.file).ok) {
          results.set(entry.file, { ok: false, line: `FAIL ${entry.file}: ${e.reason}: ${e.message.replace(/^[a-z_]+: /, "")}` });
        }
      }
    }
  }

  let good = 0;
  for (const entry of index) {
    const r = results.get(entry.file);
    console.log(r.line);
    if (r.ok) good += 1;
  }
  console.log(`${good}/${index.length} vectors OK`);
  process.exitCode = good === index.length && index.length > 0 ? 0 : 1;
}

main();
