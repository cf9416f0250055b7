// The dashboard's only script: the action buttons (calls of the same API as the CLI, with the
// page's CSRF token), the new-job editor (dry run, then create), and a job's live counters,
// rate, ETA and chart from its event stream.
(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]')?.content || '';
  const call = (method, path, body, type) => fetch(path, {
    method, credentials: 'same-origin',
    headers: { 'x-csrf-token': csrf, 'content-type': type || 'application/json' }, body
  });

  for (const b of document.querySelectorAll('button[data-action]')) {
    b.addEventListener('click', async () => {
      b.disabled = true;
      const r = await call(b.dataset.method || 'POST', b.dataset.action, '{}');
      const out = document.getElementById('action-result');
      const body = await r.json().catch(() => ({}));
      // A rerun or rollback answers with its new job: go there.
      const made = body.job_id || (body.job && body.job.job_id);
      if (r.ok && made && !location.pathname.endsWith(made)) { location.href = '/ui/jobs/' + made; return; }
      if (r.ok) { location.reload(); return; }
      if (out) out.textContent = (body.error || r.statusText);
      b.disabled = false;
    });
  }

  // The new-job editor.
  const spec = document.getElementById('spec');
  if (spec) {
    const error = document.getElementById('spec-error');
    const out = document.getElementById('preview-out');
    const create = document.getElementById('create');
    const type = () => spec.value.trimStart().startsWith('{') ? 'application/json' : 'application/toml';
    let previewed = null;
    let key = null;
    const fail = (body, r) => {
      error.textContent = body.field ? body.field + ': ' + body.error : (body.error || r.statusText);
      error.dataset.field = body.field || '';
    };
    const row = (k, v) => { const tr = document.createElement('tr'); for (const x of [k, v]) { const td = document.createElement('td'); td.textContent = x; tr.appendChild(td); } return tr; };
    const table = (id, title, entries) => {
      const h = document.createElement('h3'); h.textContent = title; out.appendChild(h);
      const t = document.createElement('table'); t.id = id;
      for (const [k, v] of entries) t.appendChild(row(k, v));
      if (!entries.length) t.appendChild(row('—', ''));
      out.appendChild(t);
    };
    spec.addEventListener('input', () => { create.disabled = spec.value !== previewed; });
    document.getElementById('preview').addEventListener('click', async () => {
      error.textContent = ''; out.textContent = ''; create.disabled = true;
      const r = await call('POST', '/v1/jobs?dry_run=true', spec.value, type());
      const p = await r.json().catch(() => ({}));
      if (!r.ok) { fail(p, r); return; }
      const eta = (p.publish_secs || 0) + (p.soak_secs || 0);
      table('preview-summary', 'What it would do', [
        ['targeted', p.targeted], ['to send', p.to_send], ['skipped', p.skipped],
        ['rate', p.max_per_second ? p.max_per_second + ' devices/s' : 'as fast as workers take them'],
        ['publishing and soaks take', p.publish_secs == null ? 'as long as the devices take' : Math.round(eta) + ' s (gates also wait for the devices)'],
      ]);
      table('preview-skipped', 'Skipped, by reason', Object.entries(p.skipped_by_reason || {}));
      table('preview-waves', 'Waves', (p.waves || []).map((w, i) => [(i + 1) + '. ' + w.name, w.size + ' devices']));
      table('preview-groups', 'By group', Object.entries(p.by_group || {}));
      table('preview-models', 'By model', Object.entries(p.by_model || {}));
      table('preview-hardware', 'By hardware revision', Object.entries(p.by_hardware_revision || {}));
      previewed = spec.value;
      key = 'ui-' + Date.now().toString(36) + '-' + Math.random().toString(36).slice(2);
      create.disabled = false;
    });
    create.addEventListener('click', async () => {
      create.disabled = true;
      const r = await fetch('/v1/jobs', {
        method: 'POST', credentials: 'same-origin', body: previewed,
        headers: { 'x-csrf-token': csrf, 'content-type': type(), 'idempotency-key': key }
      });
      const body = await r.json().catch(() => ({}));
      const made = body.job_id || (body.job && body.job.job_id);
      if (r.ok && made) { location.href = '/ui/jobs/' + made; return; }
      fail(body, r);
      create.disabled = false;
    });
  }

  // A job's live view, while the job runs: a finished job's page is final as rendered.
  const job = document.body.dataset.job;
  if (!job || document.body.dataset.live !== '1' || !window.EventSource) return;
  const FAILED = ['failed', 'rejected', 'timed_out', 'unhealthy', 'rolled_back'];
  const chart = document.getElementById('chart');
  const seconds = [];          // [{ ok, bad }] per second, the newest last
  const samples = [];          // [{ t, terminal }] for the rate
  let last = null;
  const human = (s) => s < 60 ? Math.round(s) + ' s' : s < 3600 ? Math.floor(s / 60) + ' min ' + Math.round(s % 60) + ' s' : Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' min';
  const draw = () => {
    if (!chart) return;
    const n = 120, w = 600 / n, top = Math.max(1, ...seconds.map((s) => s.ok + s.bad));
    const shown = seconds.slice(-n);
    let svg = '';
    const line = [];
    shown.forEach((s, i) => {
      const x = i * w, hOk = 110 * s.ok / top, hBad = 110 * s.bad / top;
      svg += `<rect class="ok" x="${x}" y="${120 - hOk}" width="${w - 1}" height="${hOk}"></rect>`;
      svg += `<rect class="bad" x="${x}" y="${120 - hOk - hBad}" width="${w - 1}" height="${hBad}"></rect>`;
      const done = s.ok + s.bad;
      if (done) line.push(`${x + w / 2},${120 - 110 * s.bad / done}`);
    });
    if (line.length) svg += `<polyline class="rate" points="${line.join(' ')}"></polyline>`;
    chart.innerHTML = svg;
  };
  const events = new EventSource('/v1/jobs/' + job + '/events');
  events.addEventListener('progress', (e) => {
    const p = JSON.parse(e.data);
    for (const [k, v] of Object.entries(p)) {
      const el = document.getElementById('count-' + k);
      if (el && typeof v !== 'object') el.textContent = v;
    }
    const targeted = p.targeted || 0;
    for (const s of document.querySelectorAll('#bar span[data-count]')) {
      const n = p[s.dataset.count] || 0;
      s.style.width = targeted ? (100 * n / targeted) + '%' : '0';
    }
    const bad = FAILED.reduce((a, k) => a + (p[k] || 0), 0);
    const now = { t: Date.now(), ok: p.succeeded || 0, bad, terminal: p.terminal || 0 };
    if (last) seconds.push({ ok: Math.max(0, now.ok - last.ok), bad: Math.max(0, now.bad - last.bad) });
    last = now;
    samples.push(now);
    while (samples.length > 1 && now.t - samples[0].t > 10000) samples.shift();
    if (samples.length > 1) {
      const first = samples[0];
      const rate = (now.terminal - first.terminal) / ((now.t - first.t) / 1000);
      const rateEl = document.getElementById('job-rate');
      if (rateEl) rateEl.textContent = Math.round(rate) + '/s';
      const etaEl = document.getElementById('job-eta');
      if (etaEl) etaEl.textContent = rate > 0 && p.pending ? human(p.pending / rate) : '—';
    }
    draw();
  });
  // The buttons depend on the job's state and on whether a wave waits at its gate: when
  // either differs from what the page was rendered with, the page is rendered again.
  const rendered = document.body.dataset;
  const again = () => setTimeout(() => location.reload(), 300);
  events.addEventListener('state', (e) => {
    const el = document.getElementById('job-state');
    try {
      const s = JSON.parse(e.data);
      if (el && s.state) el.textContent = s.state;
      if (s.state && s.state !== rendered.state) again();
    } catch (_) {}
  });
  events.addEventListener('wave', (e) => {
    try {
      const w = JSON.parse(e.data);
      const phase = document.getElementById('rollout-phase');
      if (phase) phase.textContent = 'Phase: ' + w.phase + (w.wave == null ? '' : ', wave ' + w.wave);
      const gate = (w.phase === 'approval' || w.phase === 'gate') ? '1' : '0';
      if (gate !== rendered.gate) again();
    } catch (_) {}
  });
  events.addEventListener('finished', () => { events.close(); setTimeout(() => location.reload(), 300); });
})();
