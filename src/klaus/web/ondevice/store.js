// The walked photos, kept on the device in IndexedDB so they survive a reload; nothing leaves it.
//
// One object store "photos" (key: an increasing id = walk order). A record holds what the page
// shows: the file's name, size, type and mtime, a small JPEG thumbnail (a Blob, not the photo),
// the crops used, the model's SHA-256, and either the predictions with their timings or the
// one-line error. Where IndexedDB is unavailable (some private windows), the store keeps the
// records in memory and says so (`persistent` is false).

const DB_NAME = 'klaus-ondevice';
const DB_VERSION = 1;
const STORE = 'photos';

function promised(request) {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

function done(tx) {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onabort = () => reject(tx.error || new Error('IndexedDB transaction aborted'));
    tx.onerror = () => reject(tx.error);
  });
}

/** The fields a stored record may have; anything else read back is dropped (records are data, never code). */
function clean(raw) {
  if (!raw || typeof raw !== 'object' || !Number.isInteger(raw.id)) return null;
  const str = (v) => (typeof v === 'string' ? v : '');
  const num = (v) => (typeof v === 'number' && Number.isFinite(v) ? v : null);
  const record = {
    id: raw.id,
    name: str(raw.name),
    size: num(raw.size),
    type: str(raw.type),
    lastModified: num(raw.lastModified),
    key: str(raw.key),
    model: str(raw.model),
    crops: raw.crops === 10 ? 10 : 1,
    thumb: raw.thumb instanceof Blob ? raw.thumb : null,
    at: num(raw.at),
    error: typeof raw.error === 'string' ? raw.error : null,
    predictions: null,
    elapsed_ms: num(raw.elapsed_ms),
    network_ms: num(raw.network_ms),
  };
  if (Array.isArray(raw.predictions)) {
    record.predictions = raw.predictions
      .filter((p) => p && typeof p === 'object')
      .map((p) => ({
        rank: num(p.rank),
        index: num(p.index),
        wnid: str(p.wnid),
        label: str(p.label),
        probability: num(p.probability) ?? 0,
        hierarchy: Array.isArray(p.hierarchy) ? p.hierarchy.map(str) : [],
      }));
  }
  return record;
}

export class Store {
  constructor(db) {
    this.db = db;
    this.memory = db ? null : new Map();
    this.nextId = 1;
    this.persistent = Boolean(db);
  }

  /** Open (or create) the store; falls back to memory with `persistent = false`. */
  static async open() {
    if (typeof indexedDB === 'undefined') return new Store(null);
    try {
      const request = indexedDB.open(DB_NAME, DB_VERSION);
      request.onupgradeneeded = () => {
        const db = request.result;
        if (!db.objectStoreNames.contains(STORE)) {
          const store = db.createObjectStore(STORE, { keyPath: 'id', autoIncrement: true });
          store.createIndex('key', 'key', { unique: false });
        }
      };
      const db = await promised(request);
      return new Store(db);
    } catch {
      return new Store(null);
    }
  }

  /** Store a record (without id); returns it with its id. */
  async add(record) {
    if (!this.db) {
      const stored = { ...record, id: this.nextId++ };
      this.memory.set(stored.id, stored);
      return clean(stored);
    }
    const tx = this.db.transaction(STORE, 'readwrite');
    const id = await promised(tx.objectStore(STORE).add(record));
    await done(tx);
    return clean({ ...record, id });
  }

  /** Every record in walk order (oldest first). */
  async all() {
    if (!this.db) return [...this.memory.values()].map(clean).filter(Boolean);
    const tx = this.db.transaction(STORE, 'readonly');
    const rows = await promised(tx.objectStore(STORE).getAll());
    return rows.map(clean).filter(Boolean).sort((a, b) => a.id - b.id);
  }

  /** Whether a photo with this identity key (name, size, mtime, crops, model) was walked already. */
  async has(key) {
    if (!this.db) return [...this.memory.values()].some((r) => r.key === key);
    const tx = this.db.transaction(STORE, 'readonly');
    const n = await promised(tx.objectStore(STORE).index('key').count(key));
    return n > 0;
  }

  async count() {
    if (!this.db) return this.memory.size;
    const tx = this.db.transaction(STORE, 'readonly');
    return promised(tx.objectStore(STORE).count());
  }

  /** Forget every walked photo. */
  async clear() {
    if (!this.db) {
      this.memory.clear();
      return;
    }
    const tx = this.db.transaction(STORE, 'readwrite');
    tx.objectStore(STORE).clear();
    await done(tx);
  }
}
