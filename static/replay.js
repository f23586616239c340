// Plays a session recording with asciinema-player (served from the npm package).
(function () {
  var el = document.getElementById("player");
  if (!el || !window.AsciinemaPlayer) {
    var note = document.getElementById("player-missing");
    if (note) note.hidden = false;
    return;
  }
  window.AsciinemaPlayer.create(el.dataset.cast, el, {
    autoPlay: true,
    speed: 2,
    idleTimeLimit: 1,
    fit: "width",
  });
})();
