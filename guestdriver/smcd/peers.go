package smcd

import "sync"

// PeerWatchers is a registry of PeerWatcher callbacks for devices to embed:
// Watch registers, Gone fires and forgets every callback for a GID.
type PeerWatchers struct {
	mu   sync.Mutex
	next uint64
	by   map[uint64]map[uint64]func() // gid -> id -> callback
}

// Watch implements PeerWatcher.WatchPeer.
func (w *PeerWatchers) Watch(gid uint64, gone func()) (cancel func()) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.by == nil {
		w.by = map[uint64]map[uint64]func(){}
	}
	w.next++
	id := w.next
	if w.by[gid] == nil {
		w.by[gid] = map[uint64]func(){}
	}
	w.by[gid][id] = gone
	return func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		delete(w.by[gid], id)
		if len(w.by[gid]) == 0 {
			delete(w.by, gid)
		}
	}
}

// Gone calls, outside the lock, every callback watching gid, once.
func (w *PeerWatchers) Gone(gid uint64) {
	w.mu.Lock()
	fns := w.by[gid]
	delete(w.by, gid)
	w.mu.Unlock()
	for _, fn := range fns {
		fn()
	}
}
